"""Image and tensor conversions shared by training callbacks, sampling and evaluation:
PIL images of any mode as 8-bit RGB (what every image reader here hands on), uint8 pixels
and PIL images as float tensors and back (:func:`from_uint8` / :func:`pil_to_tensor`,
:func:`to_uint8` / :func:`tensor_to_pil`, each with an explicit ``value_range``, [0, 1] or
[-1, 1]), the two ranges into each other, image grids, and VAE encode/decode. Every
hand-written conversion of the project goes through these (the same float operations as
the copies they replaced, so the same bits).

``Image.convert("RGB")`` clips instead of scaling: a 16-bit grey PNG (``I;16``) becomes
white, a float image (``F``) in [0, 1] black, and transparent pixels keep whatever colour
hides under them. :func:`to_rgb` maps each mode to the 8-bit RGB a viewer shows.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: What counts as an image file in a concept, reference or class-image folder (any case),
#: everywhere in the project; ``<name>_mask.png`` beside ``<name>.<suffix>`` is its subject mask.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_SUFFIX = "_mask"


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image of any mode, its values scaled, never clipped:
    16-bit grey (``I;16*``: /257), 32-bit integer grey (``I``: 16-bit range /257, or its own
    maximum beyond that), float grey (``F``: [0, 1] or [0, 255], else its own maximum),
    CMYK, palette and greyscale. Transparency (``RGBA``, ``LA``, ``PA``, a palette or
    grey image with a transparent colour) is composited onto white, as the image is seen.
    16-bit RGB PNGs already open as 8-bit ``RGB``."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        if mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / top
        else:
            scale = 1.0 / 257.0 if top <= 65535 else 255.0 / top
            if mode == "I" and top <= 255:
                scale = 1.0  # an 8-bit grey image that was stored as I
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows·(H+pad)+pad, cols·(W+pad)+pad, 3) uint8 grid, row-major."""
    n, h, w, _ = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[k]
    return grid


#: the two float ranges images take here: [0, 1] (samplers, metrics, what callers see) and
#: [-1, 1] (what the VAE and the denoiser's training batches read)
UNIT, SIGNED = (0, 1), (-1, 1)


def _check_range(value_range) -> tuple[int, int]:
    value_range = tuple(value_range)
    if value_range not in (UNIT, SIGNED):
        raise ValueError(f"value_range {value_range} is not (0, 1) or (-1, 1)")
    return value_range


def unit_to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (``x * 2 - 1``)."""
    return images * 2 - 1


def signed_to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (``x / 2 + 0.5``), not clamped."""
    return images / 2 + 0.5


def from_uint8(pixels, value_range=UNIT) -> torch.Tensor:
    """uint8 pixels, channels last — a PIL RGB image, a (H, W, 3) or (N, H, W, 3) array or
    tensor — as float32 channels first, (3, H, W) or (N, 3, H, W), in ``value_range``:
    (0, 1) is ``x / 255``, (-1, 1) is ``x / 127.5 - 1``."""
    value_range = _check_range(value_range)
    if not isinstance(pixels, torch.Tensor):
        array = np.asarray(pixels, dtype=np.uint8)
        pixels = torch.from_numpy(array if array.flags.writeable else array.copy())
    x = pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    return x.float() / 255 if value_range == UNIT else x.float() / 127.5 - 1.0


def pil_to_tensor(image: Image.Image, value_range=UNIT) -> torch.Tensor:
    """A PIL image (RGB; see :func:`to_rgb` for other modes) -> (3, H, W) float32 in ``value_range``."""
    return from_uint8(image, value_range)


def to_uint8(images: torch.Tensor, value_range=UNIT) -> np.ndarray:
    """(N, 3, H, W) float in ``value_range`` (clamped to it) -> (N, H, W, 3) uint8, rounded
    to the nearest value."""
    if _check_range(value_range) == UNIT:
        x = images.clamp(0, 1) * 255
    else:
        x = (images.clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(image: torch.Tensor, value_range=UNIT) -> Image.Image:
    """(3, H, W) float in ``value_range`` -> an RGB PIL image (as :func:`to_uint8`)."""
    return Image.fromarray(to_uint8(image[None], value_range)[0])


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> latents (the VAE posterior mean, shifted and
    scaled as the denoiser sees them): the inverse of :func:`decode`."""
    z = vae.encode(unit_to_signed(images.to(vae.device, vae.dtype))).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
    z = z.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    x = vae.decode(z).sample
    return signed_to_unit(x).clamp(0, 1)
