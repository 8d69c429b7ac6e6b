"""The Chain of Diffusion: finetune, generate from the same captions, repeat; one resumable run folder.

CONTRACT (filled in by issue 3):

    @dataclass(frozen=True)
    class MethodConfig:
        name: str                      # unique label in the run, e.g. "baseline-w2", "redifine"
        kind: str = "baseline"         # "baseline" | "redifine" | "custom"
        cfg: float | None = None       # baseline: the constant w
        schedule: str | None = None    # custom: any schedule spec (chain-axis allowed); redifine: default "redifine"
        cond_drop: float | None = None # custom/redifine: the drop probability (redifine default documented)

    @dataclass(frozen=True)
    class ChainConfig:
        iterations: int; methods: tuple[MethodConfig, ...]; train: TrainConfig
        images_per_caption: int = 1; steps: int = 20; sampler: str = "ddim"; seeds: tuple[int, ...] = (0,)  # replicates
        protocol: str = "restart" | "continue"; width: int | None = None; height: int | None = None
        negative_prompt: str = ""
        @classmethod from_dict(cls, d: dict) -> "ChainConfig"; def to_dict(self) -> dict

    def run_chain(pipeline, dataset, config: ChainConfig, run_dir, progress=None, cancel=None,
                  resume: bool = False) -> "ChainResult"
    def load_run(run_dir) -> dict      # run.json + per-iteration metrics, for reports

RUN FOLDER SCHEMA (shared contract between chain.py, metrics.py and report.py; schema_version 1):
  <run>/run.json            {"schema_version": 1, "status": "running"|"complete"|"cancelled"|"failed", "config": ChainConfig.to_dict(),
                             "seeds": [replicate seeds], "versions": {"redifine": .., "torch": .., "diffusers": .., "peft": ..},
                             "created": iso8601, "updated": iso8601, "dataset": {"n": N, "captions": [...]},
                             "pipeline": {"source": .., "kind": ..}, "features": "<feature set used for FID/KID>"}
  <run>/reference/images/<c:04d>.png   the user's D0 images (as used for training, resized), one per caption index c
  <run>/reference/metrics.json         {"metrics": image_statistics(D0)}
  <run>/<method>/seed_<S>/iter_<i:03d>/images/<c:04d>_<k:02d>.png   generated D_{i+1}: caption index c, image k of images_per_caption
  <run>/<method>/seed_<S>/iter_<i:03d>/captions.json   list of captions aligned with sorted image file names
  <run>/<method>/seed_<S>/iter_<i:03d>/lora.safetensors   LoRA_i (kohya layout), trained on D_i (D_0 = user images)
  <run>/<method>/seed_<S>/iter_<i:03d>/train.json      {"losses": [...], "seconds": ..}
  <run>/<method>/seed_<S>/iter_<i:03d>/metrics.json    {"method": name, "seed": S, "iteration": i, "metrics": {name: float},
                                                       "verdict": {"label": one of VERDICTS, "reasons": [str]}, "features": str}
                                                       metrics = image_statistics(D_{i+1}) plus "fid_ref","kid_ref" (vs D0) and
                                                       "fid_prev","kid_prev" (vs D_i; for i=0 D_i is D0); verdict compares
                                                       iteration i's metrics against iteration 0's of the same method+seed
                                                       (so a high-CFG method's own starting point is its baseline).
  <run>/<method>/seed_<S>/iter_<i:03d>/DONE            written last (atomically): an iteration without it is redone on resume
  <run>/metrics.csv, <run>/curves.png, <run>/grid_<method>.png, <run>/report.html   written by report.render_report(run)
Method folder names are the MethodConfig.name (validated: [A-Za-z0-9_.-]+). Multiple replicate seeds give error bars in curves.
"""
