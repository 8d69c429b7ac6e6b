"""Collapse metrics: weight-free image statistics, FID/KID on a documented feature set, verdicts.

CONTRACT (filled in by issue 3):

    VERDICTS = ("stable", "drifting to blur", "drifting to over-guidance")
    def image_statistics(images: torch.Tensor) -> dict[str, float]
        # images [N, H, W, 3] in [0, 1]; keys include hf_share, spectral_slope, laplacian_var, saturation,
        # colourfulness, clipped_fraction, mean_r/g/b, std_rgb, diversity
    def set_metrics(generated, reference, previous=None, features="auto") -> dict[str, float | str]
        # image_statistics(generated) + fid/kid vs reference (and vs previous) + "features" (which features were used)
    @dataclass class Verdict: label: str; reasons: list[str]
    def verdict(current: dict, baseline: dict) -> Verdict    # baseline = iteration 0's metrics
"""
