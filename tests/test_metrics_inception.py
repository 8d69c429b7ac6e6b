"""The Inception path end to end: torchvision's Inception-v3 with random weights, saved as a local safetensors file,
configured through $REDIFINE_INCEPTION_WEIGHTS, gives the features of FID, KID and the change intervals, and the
report names it and what it cannot see."""

from __future__ import annotations

import json

import numpy as np
import pytest

from redifine_core import metrics as M
from redifine_core.chain.run_folder import RunFolder
from redifine_core.metrics.calibration import changed, shapes
from redifine_core.report_answer import plain_answer


def _torchvision_problem() -> str:
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # a torchvision built for another torch fails at import with a RuntimeError
        return f"torchvision does not import here ({type(e).__name__}: {str(e).splitlines()[0]})"
    return ""


needs_torchvision = pytest.mark.skipif(bool(_torchvision_problem()),
                                       reason=_torchvision_problem() or "torchvision imports")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "inception_random.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@needs_torchvision
def test_the_configured_inception_file_gives_the_fid_features_and_intervals(weights, monkeypatch):
    monkeypatch.setenv(M.INCEPTION_ENV, str(weights))
    M.check_features("auto")
    extractor = M.get_feature_extractor("auto")
    assert isinstance(extractor, M.InceptionFeatures) and extractor.name == "inception-v3:inception_random.safetensors"
    d0, base, cur = (M.SetSummary.from_images(x, features=extractor)
                     for x in (shapes(6, 1), shapes(6, 2), changed("palette drift", 6, 3)))
    assert d0.feature_rows.shape == (6, 2048)
    again = M.SetSummary.from_images(shapes(6, 1), features=extractor)
    np.testing.assert_allclose(again.feature_rows, d0.feature_rows, rtol=1e-5, atol=1e-6)  # deterministic
    m = M.set_metrics(cur, d0, features=extractor)
    assert m["features"] == extractor.name and np.isfinite(m["fid_ref"]) and m["fid_ref"] > 0
    assert M.set_metrics(d0, d0, features=extractor)["fid_ref"] <= 1e-6 * max(1.0, m["fid_ref"])
    out = M.change_intervals(cur, base, d0)
    lo, hi = M.read_interval(out, "fid_ref")
    assert np.isfinite(lo) and lo <= hi
    assert "from the local weights file inception_random.safetensors" in M.describe_feature_set(m["features"])


def test_the_answer_says_which_inception_file_it_used_and_what_it_cannot_see(tmp_path):
    from test_report import build_fake_run

    root = build_fake_run(tmp_path / "run", status="complete")
    for p in root.glob("*/seed_*/iter_*/metrics.json"):
        d = json.loads(p.read_text())
        d["features"] = "inception-v3:inception_random.safetensors"
        p.write_text(json.dumps(d))
    answer = plain_answer(RunFolder(root).read())
    assert "FID is computed on inception-v3:inception_random.safetensors" in answer
    assert "not identity or style" in answer
