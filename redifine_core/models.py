"""Load a text-to-image pipeline offline: a diffusers folder, a single-file SD1.x/SD2.x/SDXL checkpoint, or the toy model.

CONTRACT (filled in by issue 2):

    @dataclass
    class Pipeline:
        unet: UNet2DConditionModel
        vae: AutoencoderKL
        text_encoder: CLIPTextModel
        tokenizer: CLIPTokenizer
        scheduler: SchedulerMixin           # the checkpoint's own noise scheduler (training uses it)
        kind: str                           # "sd1" | "sd2" | "sdxl" | "toy"
        source: str
        text_encoder_2: CLIPTextModelWithProjection | None = None   # SDXL
        tokenizer_2: CLIPTokenizer | None = None                    # SDXL
        device: torch.device
        dtype: torch.dtype
        vae_scale_factor: int   (property: 2 ** (len(vae.config.block_out_channels) - 1))
        default_size: int       (property: the resolution the model was trained at, e.g. 512, 1024, 32 for toy)
        prediction_type: str    (property: "epsilon" | "v_prediction")
        is_sdxl: bool           (property)
        def to(self, device=None, dtype=None) -> "Pipeline"
        @classmethod from_diffusers(cls, pipe, kind=None, source="") -> "Pipeline"   # wrap a diffusers pipeline object

    def load_pipeline(source: str | os.PathLike, device=None, dtype=None, tokenizer_dir=None) -> Pipeline
    def default_device() -> torch.device      # cuda if available else cpu
"""
