"""The denoising loop: per-step guidance scale, one batched UNet forward for [uncond, cond], no uncond pass where w == 1.

CONTRACT (filled in by issue 2):

    SAMPLERS: tuple[str, ...]  # at least "ddim", "euler", "euler_a", "dpmpp_2m", "pndm"

    def generate(pipeline: Pipeline, prompts: str | Sequence[str], schedule: str | float | Schedule = 7.5,
                 steps: int = 20, seeds: int | Sequence[int] = 0, *, negative_prompt: str | Sequence[str] = "",
                 sampler: str = "ddim", width: int | None = None, height: int | None = None,
                 batch_size: int = 8, lora: "LoraWeights | None" = None, lora_scale: float = 1.0,
                 iteration: int = 0, progress: ProgressCallback | None = None,
                 cancel: CancelFlag | None = None) -> torch.Tensor
        # returns float32 CPU tensor [N, H, W, 3] in [0, 1] (the ComfyUI IMAGE layout, = diffusers output_type="np").
        # seeds: an int s means seeds s, s+1, ..., s+N-1; image i depends only on (model, prompt i, seed i).
"""
