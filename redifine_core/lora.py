"""LoRA files: save/load kohya and diffusers layouts with alpha per module and ss_* metadata.

CONTRACT (filled in by issue 2):

    @dataclass
    class LoraWeights:
        unet: dict[str, torch.Tensor]            # peft layout, keys "<diffusers module path>.lora_A.weight" / ".lora_B.weight"
        text_encoder: dict[str, torch.Tensor]    # same, for the text encoder (usually empty)
        rank: int
        alpha: float
        target_modules: tuple[str, ...]
        metadata: dict[str, str]                 # ss_* fields
    def save_lora(lora: LoraWeights, path, layout: str = "kohya") -> Path      # atomic; layout "kohya" | "diffusers"
    def load_lora(path) -> LoraWeights                                          # either layout
    @contextmanager
    def lora_applied(pipeline: Pipeline, lora: LoraWeights | None, scale: float = 1.0)   # inject, yield, remove
"""
