"""Captioned image sets: a folder of images + same-name .txt captions (kohya), or images/tensors + a caption list.

CONTRACT (filled in by issue 2):

    @dataclass(frozen=True)
    class CaptionedImages:
        images: tuple[PIL.Image.Image, ...]   # RGB, 8-bit
        captions: tuple[str, ...]
        names: tuple[str, ...]                # file stems (or "000000", ...) for naming outputs
        def __len__(self) -> int
        @classmethod from_folder(cls, folder, default_caption: str | None = None) -> "CaptionedImages"
        @classmethod from_images(cls, images: Sequence[PIL.Image | np.ndarray | torch.Tensor] | torch.Tensor,
                                 captions: Sequence[str] | str) -> "CaptionedImages"
            # torch.Tensor batches in ComfyUI IMAGE layout [N, H, W, C] in [0, 1]
        def to_tensor(self) -> torch.Tensor   # [N, H, W, 3] float in [0, 1] (all images must share a size)
"""
