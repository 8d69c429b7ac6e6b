"""check_features: every bad features spec fails in one line, from the file's header, before any weights load."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from redifine_core import metrics as M
from redifine_core.metrics import features as F

INCEPTION_LIKE = {"Conv2d_1a_3x3.conv.weight": np.zeros((2, 3), np.float32),
                  "Mixed_7c.branch_pool.conv.weight": np.zeros((2,), np.float32)}


def one_line_error(exc_type, fn, *args, match: str):
    with pytest.raises(exc_type, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value), str(info.value)
    return info.value


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(M.INCEPTION_ENV, raising=False)


@pytest.mark.parametrize("spec", ["auto", "handcrafted", "handcrafted-v1", M.FeatureExtractor()])
def test_weight_free_specs_pass(spec, no_env):
    assert M.check_features(spec) is None
    assert M.feature_set_name(spec) == M.FEATURES_HANDCRAFTED


@pytest.mark.parametrize("spec, match", [
    ("resnet", "'resnet' not understood"),
    ("", "'' not understood"),
    ("inception:", "must be followed by the path"),
    ("inception:   ", "must be followed by the path"),
    (42, "expected a string, path or FeatureExtractor, got int"),
])
def test_unknown_specs(spec, match, no_env):
    one_line_error(ValueError, M.check_features, spec, match=match)


def test_missing_file_is_file_not_found_and_value_error(tmp_path, no_env):
    missing = tmp_path / "missing.safetensors"
    for spec in (f"inception:{missing}", str(missing), missing):
        err = one_line_error(FileNotFoundError, M.check_features, spec, match="does not exist")
        assert isinstance(err, ValueError) and str(missing) in str(err)


def test_auto_checks_the_file_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(M.INCEPTION_ENV, str(tmp_path / "nope.safetensors"))
    err = one_line_error(FileNotFoundError, M.check_features, "auto", match="does not exist")
    assert M.INCEPTION_ENV in str(err)


def test_wrong_suffix_and_folder(tmp_path, no_env):
    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"x")
    one_line_error(ValueError, M.check_features, f"inception:{pth}", match=r"must be a \.safetensors file")
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    one_line_error(ValueError, M.check_features, str(folder), match="is not a file")


@pytest.mark.parametrize("content", [b"", b"garbage!garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson"])
def test_unreadable_header(tmp_path, content, no_env):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    err = one_line_error(ValueError, M.check_features, f"inception:{path}", match="cannot read")
    assert str(path) in str(err)


def test_truncated_file(tmp_path, no_env):
    path = tmp_path / "cut.safetensors"
    save_file(INCEPTION_LIKE, str(path))
    path.write_bytes(path.read_bytes()[:-4])
    one_line_error(ValueError, M.check_features, str(path), match="cannot read")


def test_missing_torchvision_is_reported_before_loading(tmp_path, monkeypatch, no_env):
    path = tmp_path / "inception.safetensors"
    save_file(INCEPTION_LIKE, str(path))
    monkeypatch.setattr(F, "_torchvision_available", lambda: False)
    err = one_line_error(ImportError, M.check_features, str(path), match="torchvision")
    assert isinstance(err, ValueError)
    # get_feature_extractor goes through the same check, so it fails the same way without touching the weights
    one_line_error(ImportError, M.get_feature_extractor, path, match="torchvision")


def test_header_must_look_like_inception(tmp_path, monkeypatch, no_env):
    monkeypatch.setattr(F, "_torchvision_available", lambda: True)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": np.zeros((2, 2), np.float32)}, str(lora))
    one_line_error(ValueError, M.check_features, str(lora), match="not an Inception-v3 state dict")


def test_valid_header_passes_without_reading_tensors(tmp_path, monkeypatch, no_env):
    import safetensors.numpy
    import safetensors.torch

    monkeypatch.setattr(F, "_torchvision_available", lambda: True)

    def forbidden(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(safetensors.numpy, "load_file", forbidden)
    fid = tmp_path / "pt_inception.safetensors"
    save_file(dict(INCEPTION_LIKE, **{"fc.weight": np.zeros((1008, 1), np.float32)}), str(fid))
    tv = tmp_path / "tv_inception.safetensors"
    save_file(dict(INCEPTION_LIKE, **{"fc.weight": np.zeros((1000, 1), np.float32)}), str(tv))
    assert M.check_features(f"inception:{fid}") is None
    assert M.check_features(tv) is None
    assert M.feature_set_name(f"inception:{fid}") == "inception-v3-fid:pt_inception.safetensors"
    assert M.feature_set_name(str(tv)) == "inception-v3:tv_inception.safetensors"
    monkeypatch.setenv(M.INCEPTION_ENV, str(fid))
    assert M.check_features("auto") is None
    assert M.feature_set_name("auto") == "inception-v3-fid:pt_inception.safetensors"


def test_set_metrics_of_summaries_rejects_a_bad_spec_before_work(tmp_path, no_env):
    x = np.random.default_rng(0).uniform(0, 1, (3, 16, 16, 3)).astype(np.float32)
    s = M.SetSummary.from_images(x, features="handcrafted")
    one_line_error(FileNotFoundError, M.set_metrics, s, s, None, f"inception:{tmp_path / 'x.safetensors'}",
                   match="does not exist")
