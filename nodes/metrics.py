"""ReDiFineCollapseMetrics: compare a generated IMAGE batch with a reference batch and read the collapse verdict."""

from __future__ import annotations

from .common import CATEGORY, ComfyCancel, ProgressAdapter, comfy_cancellation

FEATURES = ("auto", "handcrafted")


def metrics_table(reference: dict, generated: dict) -> str:
    """A fixed-width text table: one row per metric, reference and generated values and the relative change."""
    rows = [f"{'metric':<18}{'reference':>12}{'generated':>12}{'change':>10}"]
    for name in sorted(set(reference) | set(generated)):
        r, g = reference.get(name), generated.get(name)
        if isinstance(g, str) or isinstance(r, str):
            continue
        rs = f"{r:.4g}" if isinstance(r, (int, float)) else "-"
        gs = f"{g:.4g}" if isinstance(g, (int, float)) else "-"
        ch = "-"
        if isinstance(r, (int, float)) and isinstance(g, (int, float)) and abs(r) > 1e-12:
            ch = f"{(g - r) / abs(r):+.0%}"
        rows.append(f"{name:<18}{rs:>12}{gs:>12}{ch:>10}")
    feats = generated.get("features")
    if isinstance(feats, str):
        rows.append(f"(FID/KID features: {feats})")
    return "\n".join(rows)


class ReDiFineCollapseMetrics:
    DESCRIPTION = ("Measures how far a generated set drifted from a reference set (e.g. the training images): "
                   "sharpness and spectrum (blur), saturation and clipping (over-guidance), diversity and FID/KID, "
                   "and says whether it looks stable, drifting to blur, drifting to over-guidance, drifting from the "
                   "data, or inconclusive (too few images, or signs of both modes).")
    CATEGORY = CATEGORY + "/analysis"
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("metrics", "verdict")
    OUTPUT_TOOLTIPS = ("A text table of every metric for both sets and the relative change.",
                       "The verdict ('stable', 'drifting to blur', 'drifting to over-guidance', 'drifting from the "
                       "data' or 'inconclusive') with its reasons, each change with its 95 % bootstrap "
                       "interval; a change inside the noise or fewer than 16 images per set read 'inconclusive'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference": ("IMAGE", {"tooltip": "The reference images (e.g. the training set D0), at least 2."}),
            "generated": ("IMAGE", {"tooltip": "The images to judge (e.g. a later chain iteration), at least 2."}),
            "features": (list(FEATURES), {"default": "auto", "tooltip":
                         "Features for FID/KID: auto = Inception weights if installed locally, else the weight-free "
                         "handcrafted set; handcrafted = always the weight-free set."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def measure(self, reference, generated, features, unique_id=None):
        from redifine_core.metrics import SetSummary, change_intervals, get_feature_extractor, set_metrics, verdict

        for name, batch in (("reference", reference), ("generated", generated)):
            if int(batch.shape[0]) < 2:
                raise ValueError(f"{name}: needs at least 2 images for FID/KID, got {int(batch.shape[0])}")
        feats = "handcrafted" if features == "handcrafted" else "auto"
        with comfy_cancellation():
            extractor = get_feature_extractor(feats)  # Inception weights (if any) load once
            ref_set = SetSummary.from_images(reference, features=extractor, cancel=ComfyCancel())
            gen_set = SetSummary.from_images(generated, features=extractor, cancel=ComfyCancel())
            ref = set_metrics(ref_set, ref_set, features=extractor, cancel=ComfyCancel())
            gen = set_metrics(gen_set, ref_set, features=extractor, progress=ProgressAdapter(unique_id),
                              cancel=ComfyCancel())
        intervals = change_intervals(gen_set, ref_set)  # each change's 95 % interval: its signs quote it
        v = verdict({**gen, **intervals}, ref, n_images=min(int(reference.shape[0]), int(generated.shape[0])))
        table = metrics_table(ref, gen)
        text = v.label + "".join(f"\n- {r}" for r in v.reasons)
        return {"ui": {"text": [table + "\n\nverdict: " + text]}, "result": (table, text)}
