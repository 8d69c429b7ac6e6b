"""The toy training script: writes a loadable diffusers folder atomically, and resumes bit-for-bit from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from redifine_core.toy.train import ToyTrainConfig, train

TINY = dict(n_images=48, vae_images=48, vae_steps=2, decoder_steps=2, steps=4, batch_size=4, warmup=1)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_train_writes_folder_and_resume_reproduces_it(tmp_path):
    cfg = ToyTrainConfig(**TINY)
    logs: list[str] = []
    out1 = train(cfg, tmp_path / "m1", tmp_path / "work", checkpoint_every=2, log=logs.append)
    assert (tmp_path / "work" / "state.json").exists()  # a checkpoint at step 2 of 4
    meta = json.loads((out1 / "training.json").read_text())
    assert meta["steps_done"] == 4 and meta["config"]["steps"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m1")]  # no temp folder left behind

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out1), local_files_only=True)
    assert pipe.unet.config.sample_size == 16 and pipe.tokenizer.model_max_length == 16

    # a second run with the same work folder resumes at the checkpoint and ends with identical weights
    logs.clear()
    out2 = train(cfg, tmp_path / "m2", tmp_path / "work", checkpoint_every=2, log=logs.append)
    assert any("resumed at step 2" in line for line in logs)
    w1, w2 = _weights(out1), _weights(out2)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_bed_arch_trains_on_both_sets_with_one_token_per_caption_word(tmp_path):
    from diffusers import StableDiffusionPipeline

    from redifine_core.toy.registry import TOY_DATASETS

    out = train(ToyTrainConfig(**TINY, arch="bed"), tmp_path / "bed", tmp_path / "work", checkpoint_every=0,
                log=lambda _: None)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    for name in ("shapes", "textures", "patterned_shapes"):
        caption = TOY_DATASETS[name].balanced_captions(1, 0)[0]
        ids = pipe.tokenizer(caption).input_ids
        assert len(ids) == len(caption.split()) + 2, caption  # each word one token, plus start and end
    assert json.loads((out / "training.json").read_text())["config"]["arch"] == "bed"


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(cond_drop=1.0), "cond_drop"),
    (dict(ema=1.0), "ema"), (dict(batch_size=0), "batch_size"), (dict(decoder_steps=-1), "decoder_steps"),
    (dict(decoder_lr=0.0), "decoder_lr"), (dict(decoder_edge=-0.5), "decoder_edge"),
    (dict(steps=10**7), "steps"), (dict(n_images=True), "n_images"), (dict(arch="cats"), "arch"),
    (dict(vae_batch_size=-1), "vae_batch_size"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ToyTrainConfig(**kwargs)


@pytest.mark.parametrize("argv, expected", [
    (["--device", "tpu"], "device='tpu' is not a device"),
    (["--device", "cuda:7"], "device='cuda:7'"),
    (["--threads", "0"], "--threads=0 must be an integer in [1, 1024]"),
    (["--steps", "-3"], "steps=-3 must be an integer in [0, 1000000]"),
    (["--n-images", "0"], "n_images=0 must be an integer in [1, 1000000]"),
    (["--minutes", "0"], "--minutes=0.0 must be > 0"),
    (["--seed", "-1"], "--seed=-1 must be an integer in [0, 2**63-1]"),
    (["--checkpoint-every", "0"], "--checkpoint-every=0 must be an integer >= 1"),
    (["--arch", "cats"], "argument --arch: invalid choice: 'cats'"),
])
def test_cli_refuses_bad_arguments_in_one_line_before_writing(tmp_path, capsys, argv, expected):
    from redifine_core.toy.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m redifine_core.toy.train: error: ")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_decoder_finetune_sharpens_reconstructions_without_moving_the_latents():
    """Phase 1b trains the decoder alone on the encoder's mean latents: the encoder (and so every latent phase 2
    learns) is bit-for-bit unchanged, the decoder moves, and its reconstructions of the means get closer."""
    import torch.nn.functional as F

    from redifine_core.toy import model_config as mc
    from redifine_core.toy.dataset import generate
    from redifine_core.toy.train import _to_tensor, finetune_decoder

    cfg = ToyTrainConfig(**{**TINY, "decoder_steps": 40, "decoder_lr": 1e-3, "batch_size": 8})
    images = generate(48, seed=3)[0]
    vae = mc.build_vae(0).eval()
    x = _to_tensor(images)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        mean0 = vae.encode(x).latent_dist.mean
        err0 = F.mse_loss(vae.decode(mean0).sample, x).item()
    finetune_decoder(cfg, vae, images)
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent_dist.mean, mean0)
        err1 = F.mse_loss(vae.decode(mean0).sample, x).item()
    assert err1 < 0.75 * err0, (err0, err1)  # measured 0.38 -> 0.23


@pytest.mark.parametrize("argv, expected", [
    (["--n", "0"], "--n=0 must be an integer in [1, 10000]"),
    (["--cfg", "2", "nan"], "--cfg=nan must be a number in [0, 100]"),
    (["--steps", "0"], "--steps=0 must be an integer in [1, 10000]"),
    (["--device", "tpu"], "device='tpu' is not a device"),
    (["--model", "/nonexistent/toy"], "--model='/nonexistent/toy' is not a diffusers folder"),
    (["--dataset", "cats"], "argument --dataset: invalid choice: 'cats'"),
])
def test_evaluate_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys, argv, expected):
    from redifine_core.toy.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["--json", str(tmp_path / "out.json"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
