"""``redifine check``: bad input is one line before anything loads or is written; the toy check runs end to end,
resumes after an interrupt, and answers on one screen."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from redifine_core import cli
from redifine_core.check import ARMS, check_inputs, has_run, out_name, run_check
from redifine_core.check_answer import DIRECTIONS, check_answer
from redifine_core.progress import Cancelled, CancelToken
from tests.helpers import write_captioned_folder


def _cli_error(capsys, *argv) -> str:
    rc = cli.main(["check", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_USAGE, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture
def folder(tmp_path):
    return write_captioned_folder(tmp_path / "imgs")


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, folder):
    out = tmp_path / "out"
    base = ["--images", str(folder), "--model", "toy", "--out", str(out)]
    assert "lora" in _cli_error(capsys, "--lora", str(tmp_path / "missing.safetensors"), *base)
    assert "rounds=1 must be an integer in [2, 50]" in _cli_error(capsys, "--lora", "toy", *base, "--rounds", "1")
    assert "rounds=51" in _cli_error(capsys, "--lora", "toy", *base, "--rounds", "51")
    assert "cfg=0.5 must be a number in [1, 30]" in _cli_error(capsys, "--lora", "toy", *base, "--cfg", "0.5")
    assert "cfg=nan" in _cli_error(capsys, "--lora", "toy", *base, "--cfg", "nan")
    (folder / "img0.txt").unlink()
    assert "has no caption file" in _cli_error(capsys, "--lora", "toy", *base)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in _cli_error(capsys, "--lora", "toy", "--images", str(empty), "--model", "toy",
                                           "--out", str(out))
    loha = tmp_path / "loha.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w{i}_{s}": torch.zeros(2, 2)
               for i in (1, 2) for s in "ab"}, str(loha))
    assert "LoHa" in _cli_error(capsys, "--lora", str(loha), "--images", "toy", "--model", "toy", "--out", str(out))
    assert "model='toy'" in _cli_error(capsys, "--lora", "toy", "--images", "toy", "--model", str(tmp_path),
                                       "--out", str(out))
    assert "holds no check to resume" in _cli_error(capsys, "--lora", "toy", "--images", "toy", "--model", "toy",
                                                    "--out", str(out), "--resume")
    assert not out.exists()


def test_out_name_follows_every_input_a_resume_keeps():
    names = {out_name("a.safetensors", "imgs", 7, 3), out_name("b.safetensors", "imgs", 7, 3),
             out_name("a.safetensors", "other", 7, 3), out_name("a.safetensors", "imgs", 7.5, 3),
             out_name("a.safetensors", "imgs", 7, 4)}
    assert len(names) == 5 and all("/" not in n for n in names)


def test_non_empty_out_needs_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        check_inputs("toy", "toy", "toy", out=out)


def test_toy_check_end_to_end_with_an_interrupt(tmp_path, capsys):
    """Interrupted after its first round, resumed: the finished round is kept, the answer is one screen whose
    direction is the verdict's, and the grid holds both arms."""
    out = tmp_path / "check"
    token = CancelToken()
    done = []

    def stop_after_first_unit(ev):
        if ev.phase == "chain" and (ev.extra or {}).get("stage") == "verdict":
            done.append(ev.step)
            token.set()

    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        run_check("toy", "toy", "toy", cfg=7.5, rounds=2, out=out, progress=stop_after_first_unit, cancel=token)
    assert done == [1] and has_run(out)
    run = json.loads((out / "chain" / "run.json").read_text())
    assert run["status"] == "cancelled" and run["config"]["init_lora"].endswith("your_lora.safetensors")
    first = out / "chain" / ARMS[0] / "seed_0" / "iter_000"
    stamp = (first / "DONE").read_text()
    assert json.loads((first / "train.json").read_text())["losses"] == []  # round 0 is the LoRA as it is
    result = run_check("toy", "toy", "toy", cfg=7.5, rounds=2, out=out, resume=True)
    wall = time.perf_counter() - t0
    print(f"toy check wall time (2 rounds, interrupted once): {wall:.0f} s")
    assert (first / "DONE").read_text() == stamp  # not redone
    assert json.loads((out / "chain" / "run.json").read_text())["status"] == "complete"
    assert result.read["ss_max_train_steps"] == "12" and "min_snr_gamma" in result.assumed
    # the answer states the your-cfg arm's own last verdict (lane reading) in plain words
    last = json.loads((out / "chain" / ARMS[0] / "seed_0" / "iter_001" / "metrics.json").read_text())
    answer = check_answer(out)
    assert answer == result.answer == (out / "answer.txt").read_text().strip()
    direction = [ln for ln in answer.splitlines() if "Direction:" in ln][0]
    assert DIRECTIONS[last["verdict"]["label"]] in direction
    assert "Does ReDiFine hold it?" in answer and "redifine(7.5)" in answer
    assert len(answer.splitlines()) <= 12
    from PIL import Image

    with Image.open(result.grid) as grid:
        assert grid.size[0] > grid.size[1]  # 1 + 2 arms x 2 rounds columns
    assert "check_grid.png" in (out / "check.html").read_text()


@pytest.mark.parametrize("protocol", ["restart", "continue"])
def test_chain_init_lora_is_round_0_untrained_and_the_start_of_every_training(tmp_path, protocol):
    """The chain hook a check stands on: iteration 0 generates with the given LoRA as it is (no training), and each
    later iteration trains from it (restart) or from the previous LoRA (continue)."""
    from safetensors.torch import load_file

    from redifine_core.atomic import save_safetensors
    from redifine_core.chain import MethodConfig, run_chain
    from tests.test_chain import PIPE, FakeBackend, _cfg, _dataset

    init = tmp_path / "artist.safetensors"
    save_safetensors(init, {"w": torch.tensor([0.25, 0.5, 0.0])})
    fb = FakeBackend()
    cfg = _cfg(iterations=3, protocol=protocol, methods=(MethodConfig("yours", cfg=7.0),), init_lora=str(init))
    run_chain(PIPE, _dataset(), cfg, tmp_path / "r", backend=fb.backend(), render=False)
    assert len(fb.finetune_calls) == 2 and all(c["init"] for c in fb.finetune_calls)  # iterations 1 and 2 only
    lora = [load_file(str(tmp_path / "r" / "yours" / "seed_0" / f"iter_{i:03d}" / "lora.safetensors"))["w"]
            for i in range(3)]
    assert torch.equal(lora[0], torch.tensor([0.25, 0.5, 0.0]))
    # the fake finetune returns [pixel mean, its seed's fraction, cond drop] + its init's weights, so the seed part
    # of LoRA_i minus the LoRA it started from is exactly iteration i's own seed fraction
    from redifine_core.chain import train_seed

    start = {1: lora[0], 2: lora[0] if protocol == "restart" else lora[1]}
    for i in (1, 2):
        own = lora[i] - start[i]
        assert float(own[1]) == pytest.approx(train_seed(cfg.train.seed, 0, i) % 1000 / 1000.0, abs=1e-6)
    with pytest.raises(ValueError, match="init_lora"):
        _cfg(init_lora="")
