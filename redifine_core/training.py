"""Condition-drop LoRA finetuning with peft.

CONTRACT (filled in by issue 2):

    @dataclass(frozen=True)
    class TrainConfig:
        steps: int = 200; learning_rate: float = 1e-4; rank: int = 4; alpha: float = 4.0
        cond_drop: float = 0.0; batch_size: int = 4; grad_accum: int = 1; warmup_steps: int = 0
        resolution: int | None = None (None = pipeline.default_size); center_crop: bool = True; random_flip: bool = False
        target: tuple[str, ...] = ("attention",)   # also "feedforward", "resnet", "text_encoder"
        mixed_precision: str = "no" | "fp16" | "bf16"; gradient_checkpointing: bool = False
        noise_offset: float = 0.0; seed: int = 0; weight_decay: float = 1e-2
        # __post_init__ raises ValueError naming field, value and what is allowed

    @dataclass
    class TrainResult:
        lora: LoraWeights
        losses: list[float]          # one per optimizer step
        seconds: float

    def finetune_lora(pipeline, dataset: CaptionedImages, config: TrainConfig, progress=None, cancel=None,
                      init_lora: LoraWeights | None = None) -> TrainResult
        # init_lora: continue training an existing LoRA (the chain's "continue" protocol)
"""
