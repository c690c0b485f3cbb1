"""Real images of a concept and the cache of their embeddings.

The real images of a concept do not change during a training run or a sweep, so each
backbone embeds them once: :class:`ReferenceCache` keeps the embeddings in memory and
(optionally) on disk, keyed by the backbone's identity and the images themselves (file
names, sizes and times for a folder; a content hash for tensors).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from components.pixels import IMAGE_SUFFIXES, MASK_SUFFIX, pil_to_tensor, to_rgb
from metrics.backbones import ImageBackbone


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; subject masks
    (``<name>_mask.png``, see the concept DataModule) are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Concept image folder {str(folder)!r} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX))
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}.")
    return files


def load_images(folder: str | os.PathLike) -> list[torch.Tensor]:
    """The images of a folder as float RGB tensors (3, H, W) in [0, 1], each at its own size."""
    from PIL import Image

    out = []
    for path in image_files(folder):
        with Image.open(path) as im:
            out.append(pil_to_tensor(to_rgb(im)))
    return out


def _images_key(images) -> str:
    if isinstance(images, (str, os.PathLike)):
        stamps = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in image_files(images)]
        return "files:" + "|".join(stamps)
    h = hashlib.sha256()
    for im in images:
        t = im.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.float().numpy().tobytes())
    return "tensors:" + h.hexdigest()


class ReferenceCache:
    """Embeddings of real images per (backbone, images), in memory and on disk.

    ``folder=None`` keeps them in memory only.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}

    def get(self, backbone: ImageBackbone, images: str | os.PathLike | torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Unit embeddings (M, D) of the real images: a folder path, a (M, 3, H, W) batch
        or a list of (3, H, W) tensors in [0, 1]. Embedded at most once per backbone."""
        key = hashlib.sha256(f"{backbone.identity}\n{_images_key(images)}".encode()).hexdigest()[:24]
        if key in self._memory:
            return self._memory[key].to(backbone.device)
        path = self.folder / f"{key}.pt" if self.folder is not None else None
        if path is not None and path.exists():
            emb = torch.load(path, map_location="cpu", weights_only=True)
        else:
            loaded = load_images(images) if isinstance(images, (str, os.PathLike)) else images
            emb = backbone.embed_images(loaded).cpu()  # (M, D)
            if path is not None:
                from components.atomic import atomic_path

                with atomic_path(path) as tmp:  # concurrent ranks never read half a file
                    torch.save(emb, tmp)
        self._memory[key] = emb
        return emb.to(backbone.device)

    def __len__(self) -> int:
        return len(self._memory)
