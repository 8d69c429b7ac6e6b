"""The answer first: plain sentences built from the run's own numbers, and reasons written out in the table."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from redifine_core import report as R
from redifine_core.chain.run_folder import RunFolder
from redifine_core.report_answer import plain_answer, verdict_table_html
from test_report import ITERATIONS, SEEDS, build_fake_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_fake_run(tmp_path_factory.mktemp("answer") / "run", status="complete")


def _metrics_files(root, method, it):
    return [root / method / f"seed_{s}" / f"iter_{it:03d}" / "metrics.json" for s in SEEDS]


def _mean(root, method, it, key):
    vals = [json.loads(p.read_text())["metrics"][key] for p in _metrics_files(root, method, it)]
    return sum(vals) / len(vals)


def test_one_sentence_per_method_with_the_runs_own_numbers(run_dir):
    text = plain_answer(run_dir)
    lines = text.splitlines()
    assert lines[0].startswith(f"Over {ITERATIONS} rounds of training on its own images (6 images a round; 2 seeds")
    w1 = next(l for l in lines if l.startswith("baseline-w1 (CFG 1)"))
    w9 = next(l for l in lines if l.startswith("baseline-w9 (CFG 9)"))
    assert "drifted towards blur" in w1 and "drifted towards over-guidance" in w9
    last = ITERATIONS - 1
    names = {"high-frequency share": "hf_share", "Laplacian variance (edge sharpness)": "laplacian_var",
             "saturation": "saturation", "colourfulness": "colourfulness"}
    for method, line in (("baseline-w1", w1), ("baseline-w9", w9)):
        quoted = re.findall(r"(high-frequency share|Laplacian variance \(edge sharpness\)|saturation|colourfulness) "
                            r"([+-]\d+)%", line)
        assert quoted, line
        for name, pct in quoted:  # every quoted change is the run's own: round 0 to the last round, mean of seeds
            k = names[name]
            assert int(pct) == round(100 * (_mean(run_dir, method, last, k) / _mean(run_dir, method, 0, k) - 1))
    fid0, fid = _mean(run_dir, "baseline-w9", 0, "fid_ref"), _mean(run_dir, "baseline-w9", last, "fid_ref")
    assert f"FID against your images {fid0:.3g} -> {fid:.3g}" in w9
    red = next(l for l in lines if l.startswith("redifine (ReDiFine: condition drop 0.1 and CFG schedule redifine = "
                                                "exp(7.5, 1, 3))"))
    assert "only round 0 has finished" in red  # its round 1 has no DONE
    assert lines[-3].startswith("Closest to your images at the end: ")
    assert lines[-2].startswith("FID is computed on handcrafted-v1, the weight-free feature set")
    assert "it cannot see meaning or identity" in lines[-2]


def test_changing_a_metric_changes_the_sentence(run_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run_dir, root)
    before = next(l for l in plain_answer(root).splitlines() if l.startswith("baseline-w9"))
    base = _mean(root, "baseline-w9", 0, "saturation")
    for p in _metrics_files(root, "baseline-w9", ITERATIONS - 1):
        d = json.loads(p.read_text())
        d["metrics"]["saturation"] = base * 3.17
        p.write_text(json.dumps(d))
    after = next(l for l in plain_answer(RunFolder(root).read()).splitlines() if l.startswith("baseline-w9"))
    assert after != before and "saturation +217%" in after and "saturation +217%" not in before
    # a method whose rounds read stable quotes its largest change instead of a direction
    for p in (p for it in range(1, ITERATIONS) for p in _metrics_files(root, "baseline-w9", it)):
        d = json.loads(p.read_text())
        d["verdict"] = {"label": "stable", "reasons": ["all metrics within thresholds of iteration 0"]}
        p.write_text(json.dumps(d))
    stable = next(l for l in plain_answer(root).splitlines() if l.startswith("baseline-w9"))
    assert re.search(r"showed no clear drift by round 2 \(largest change: saturation \+217% \[[+-]\d+%, [+-]\d+%\]\)",
                     stable), stable


def test_report_opens_with_the_answer_and_writes_reasons_out(run_dir):
    html = R.render_report(run_dir).read_text()
    body = html[html.index("<body>"):]
    first = re.search(r"</h1>\s*<div class=\"answer\"><p>Over 3 rounds", body)
    assert first and first.start() < body.index("status:")
    table = html[html.index("<h2>Verdicts</h2>"):html.index("<h2>Metrics per iteration</h2>")]
    reasons = json.loads(_metrics_files(run_dir, "baseline-w9", 2)[0].read_text())["verdict"]["reasons"]
    import html as h

    assert f"<li>{h.escape(reasons[0])}</li>" in table  # visible, not only in the hover text
    # stable cells show their reason too
    assert "<li>all metrics within thresholds of iteration 0</li>" in table
    features = html[html.index("<h2>Feature set for FID/KID</h2>"):html.index("<h2>Configuration</h2>")]
    assert "<code>handcrafted-v1</code>" in features and "it cannot see meaning or identity" in features
    assert "CLIP score: not computed in this run" in features


def test_every_label_has_a_colour_and_inconclusive_shows_why(run_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run_dir, root)
    p = _metrics_files(root, "baseline-w1", 1)[0]
    d = json.loads(p.read_text())
    d["verdict"] = {"label": "inconclusive", "reasons": ["only 6 images per set: below 16", "would read: stable"]}
    p.write_text(json.dumps(d))
    table = verdict_table_html(RunFolder(root).read())
    for label in ("stable", "drifting to blur", "drifting to over-guidance", "drifting from the data",
                  "inconclusive"):
        assert re.search(rf'<span class="v" style="background:#[0-9a-f]{{6}}"[^>]*>{label}</span>', table), label
    assert "<li>only 6 images per set: below 16</li>" in table


def test_no_finished_round_says_so(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "run.json").write_text(json.dumps({"schema_version": 1, "status": "running", "config": {
        "iterations": 2, "methods": [{"name": "a", "kind": "baseline", "cfg": 3.0}]}, "seeds": [0]}))
    assert plain_answer(root).startswith("No round has finished yet")



@pytest.mark.parametrize("last_clipped, quoted", [(1e-5, False), (0.3, True)])
def test_clipped_pixels_are_quoted_only_when_they_rose_noticeably(run_dir, tmp_path, last_clipped, quoted):
    """A clipped fraction going from 0 to 1e-5 is no evidence of over-guidance (it read "0.00% -> 0.00%")."""
    root = tmp_path / "copy"
    shutil.copytree(run_dir, root)
    last = ITERATIONS - 1
    for seed_file0, seed_file in zip(_metrics_files(root, "baseline-w9", 0), _metrics_files(root, "baseline-w9", last)):
        d0, d = json.loads(seed_file0.read_text()), json.loads(seed_file.read_text())
        for k in ("hf_share", "laplacian_var", "colourfulness"):  # only saturation (and clipping) move
            d["metrics"][k] = d0["metrics"][k]
        d["metrics"]["saturation"] = 2 * d0["metrics"]["saturation"]
        d0["metrics"]["clipped_fraction"], d["metrics"]["clipped_fraction"] = 0.0, last_clipped
        seed_file0.write_text(json.dumps(d0))
        seed_file.write_text(json.dumps(d))
    line = next(l for l in plain_answer(root).splitlines() if l.startswith("baseline-w9"))
    assert "drifted towards over-guidance" in line and "saturation +100%" in line, line
    assert ("clipped pixels 0.00% -> 30.00%" in line) is quoted and ("clipped pixels" in line) is quoted, line


def test_drift_sentence_names_its_largest_change_and_what_the_other_seeds_read(run_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run_dir, root)
    last = ITERATIONS - 1
    first_seed, second_seed = _metrics_files(root, "baseline-w9", last)
    d = json.loads(first_seed.read_text())
    d["verdict"] = {"label": "drifting from the data", "reasons": ["fid_ref +80% vs iteration 0"]}
    first_seed.write_text(json.dumps(d))
    line = next(l for l in plain_answer(root).splitlines() if l.startswith("baseline-w9"))
    moves = {k: _mean(root, "baseline-w9", last, k) / _mean(root, "baseline-w9", 0, k) - 1
             for k in ("hf_share", "laplacian_var", "saturation", "colourfulness")}
    names = {"hf_share": "high-frequency share", "laplacian_var": "Laplacian variance (edge sharpness)",
             "saturation": "saturation", "colourfulness": "colourfulness"}
    top = max(moves, key=lambda k: abs(moves[k]))
    assert "drifted away from your images without blurring or over-guiding in 1 of 2 seeds " \
           "(1 seed: drifting to over-guidance)" in line, line
    assert f"(largest change in its image statistics: {names[top]} {moves[top]:+.0%} [" in line, line


def test_each_quoted_change_carries_its_interval_across_seeds(run_dir):
    """Two seeds: a t interval (95 %, 1 degree of freedom) of the seeds' own changes from round 0."""
    from scipy import stats

    w9 = next(l for l in plain_answer(run_dir).splitlines() if l.startswith("baseline-w9"))
    last = ITERATIONS - 1
    changes = []
    for p0, p in zip(_metrics_files(run_dir, "baseline-w9", 0), _metrics_files(run_dir, "baseline-w9", last)):
        a, b = (json.loads(x.read_text())["metrics"]["saturation"] for x in (p0, p))
        changes.append(b / a - 1)
    mean, half = sum(changes) / 2, stats.t.ppf(0.975, 1) * abs(changes[0] - changes[1]) / 2
    assert f"saturation {_mean(run_dir, 'baseline-w9', last, 'saturation') / _mean(run_dir, 'baseline-w9', 0, 'saturation') - 1:+.0%} " \
           f"[{mean - half:+.0%}, {mean + half:+.0%}]" in w9, w9
    assert "[intervals] 95% across seeds" in plain_answer(run_dir).splitlines()[0]


def test_one_seed_quotes_the_bootstrap_interval_stored_with_its_metrics(run_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run_dir, root)
    run = json.loads((root / "run.json").read_text())
    run["seeds"] = [SEEDS[0]]
    (root / "run.json").write_text(json.dumps(run))
    for s in SEEDS[1:]:
        for m in ("baseline-w1", "baseline-w9"):
            shutil.rmtree(root / m / f"seed_{s}")
    p = _metrics_files(root, "baseline-w9", ITERATIONS - 1)[0]
    d = json.loads(p.read_text())
    d["metrics"].update(saturation_change_lo=0.52, saturation_change_hi=1.1, fid_ref_change_lo=-0.2,
                        fid_ref_change_hi=0.9)
    p.write_text(json.dumps(d))
    text = plain_answer(root)
    w9 = next(l for l in text.splitlines() if l.startswith("baseline-w9"))
    assert re.search(r"saturation [+-]\d+% \[\+52%, \+110%\]", w9), w9
    assert re.search(r"FID against your images \S+ -> \S+ \([+-]\d+% \[-20%, \+90%\]\)", w9), w9
    assert "[intervals] 95%, bootstrap over the images" in text.splitlines()[0]
