"""Image preprocessing for the metric backbones, in torch, read from the backbone's own config.

Each backbone folder (or hub id) carries an image-processor config
(``preprocessor_config.json``): resize, center crop, rescale, normalize. The transformers
processors run these steps in PIL/numpy one image at a time (without torchvision), which
is slow and quantizes to uint8; here the same steps run batched in torch on the
metric's device, on float images in [0, 1]:

1. resize: the shortest edge to ``size["shortest_edge"]`` (CLIP, DINOv2) or the whole
   image to ``(size["height"], size["width"])`` (ViT / DINO), antialiased, with the
   processor's resampling filter, clamped to [0, 1] as an 8-bit image would be;
2. center crop to ``crop_size``;
3. normalize with ``image_mean`` / ``image_std``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

# PIL resampling codes stored in processor configs -> torch interpolation modes.
# LANCZOS (1), BOX (4) and HAMMING (5) have no torch kernel; bicubic is the closest.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}

# Processor types whose integer ``size`` means "shortest edge" rather than "square".
_SHORTEST_EDGE_TYPES = ("CLIP", "Bit", "ConvNext", "Siglip2")


@dataclass
class ImagePreprocess:
    """Batched torch version of a transformers image processor config.

    ``resize``: ``("shortest_edge", s)`` or ``("square", (h, w))`` or None.
    ``crop``: ``(h, w)`` or None.
    """

    resize: tuple[str, object] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "bicubic"
    scale: float = 1.0  # multiplies [0, 1] pixels: 255 * rescale_factor (1.0 for 1/255)

    @classmethod
    def from_config(cls, cfg: dict) -> "ImagePreprocess":
        """Build from a processor config dict (the content of ``preprocessor_config.json``)."""
        kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
        shortest_default = kind.startswith(_SHORTEST_EDGE_TYPES)
        resize = None
        if cfg.get("do_resize", True) and cfg.get("size") is not None:
            size = cfg["size"]
            if isinstance(size, int):
                size = {"shortest_edge": size} if shortest_default else {"height": size, "width": size}
            if "shortest_edge" in size:
                resize = ("shortest_edge", int(size["shortest_edge"]))
            elif "height" in size and "width" in size:
                resize = ("square", (int(size["height"]), int(size["width"])))
            else:
                raise ValueError(
                    f"Unsupported 'size' {size} in the image processor config ({kind or 'unknown type'}): "
                    "expected an int, {'shortest_edge': s} or {'height': h, 'width': w}."
                )
        crop = None
        # CLIP and Bit (DINOv2) processors crop by default, ViT ones have no crop
        if cfg.get("do_center_crop", shortest_default) and cfg.get("crop_size") is not None:
            c = cfg["crop_size"]
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if cfg.get("do_normalize", True):
            mean, std = tuple(cfg["image_mean"]), tuple(cfg["image_std"])
        rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        return cls(resize, crop, mean, std, _RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic"), 255.0 * rescale)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """The (h, w) every image ends at, when the config fixes it."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "square":
            return self.resize[1]
        return None

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Float images in [0, 1], a (N, 3, H, W) batch or a list of (3, H, W) of any sizes,
        to normalized pixel values (N, 3, h, w)."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"Expected images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
            out = self._geometry(images)
        else:  # images of different sizes: resize one by one, then stack
            out = torch.cat([self._geometry(im.unsqueeze(0)) for im in images])
        mean = torch.tensor(self.mean, device=out.device, dtype=out.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=out.device, dtype=out.dtype).view(1, 3, 1, 1)
        return (out * self.scale - mean) / std

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if self.resize is not None:
            if self.resize[0] == "shortest_edge":
                s = self.resize[1]
                # the same rounding as transformers' get_resize_output_image_size
                target = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            else:
                target = self.resize[1]
            if tuple(target) != (h, w):
                antialias = self.mode in ("bilinear", "bicubic")
                x = F.interpolate(x, size=target, mode=self.mode, antialias=antialias).clamp(0, 1)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        return x


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, h, w), zero-padding when the image is smaller, as transformers does."""
    h, w = x.shape[-2:]
    ch, cw = size
    if ch > h or cw > w:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]
