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
        images_per_caption: int = 1; steps: int = 20; sampler: str = "ddim"; seed: int = 0
        protocol: str = "restart" | "continue"; width: int | None = None; height: int | None = None
        negative_prompt: str = ""
        @classmethod from_dict(cls, d: dict) -> "ChainConfig"; def to_dict(self) -> dict

    def run_chain(pipeline, dataset, config: ChainConfig, run_dir, progress=None, cancel=None,
                  resume: bool = False) -> "ChainResult"
    def load_run(run_dir) -> dict      # run.json + per-iteration metrics, for reports
"""
