"""CLIP-I, CLIP-T and DINO as torchmetrics ``Metric``s.

- CLIP-I (image similarity): mean cosine similarity of CLIP image embeddings over all
  (generated, real) pairs of a concept.
- DINO: the same with the CLS embedding of DINO ViT-S/16 (or DINOv2-S).
- CLIP-T (text similarity): mean cosine similarity of a generated image and its prompt,
  written with the superclass word in the subject slot (``"a dog on the beach"``), or
  with the slot removed (``clip_t_text(..., mode="remove")``).

The states are a sum and a count (``dist_reduce_fx="sum"``), so ``compute()`` on any
number of ranks gives the mean over all images of all ranks, whatever each rank saw.
Cosines are plain (in [-1, 1]), not torchmetrics' CLIPScore ``100 * max(cos, 0)``.

Each ``update`` takes images (N, 3, H, W) in [0, 1], or precomputed unit embeddings of
its backbone (``embeddings=``) so that CLIP-I and CLIP-T share one forward pass.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from components.personalized import fill
from metrics.backbones import ClipBackbone, ImageBackbone


def clip_t_text(template: str, superclass: str, mode: str = "superclass") -> str:
    """The text CLIP-T compares an image with: the template with the superclass word in
    its slot (``mode="superclass"``) or with the slot removed (``mode="remove"``)."""
    if mode == "superclass":
        return fill(template, superclass)
    if mode == "remove":
        return fill(template, "")
    raise ValueError(f"Unknown CLIP-T text mode {mode!r}: choose 'superclass' or 'remove'.")


class _SumCount(Metric):
    """A mean over images, kept as a sum and a count so it syncs exactly across ranks."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, per_image: torch.Tensor) -> None:
        self.total += per_image.detach().double().sum().to(self.total.device)
        self.count += per_image.numel()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class ImageSimilarity(_SumCount):
    """Mean cosine similarity between generated images and a concept's real images.

    Set the real images once per concept with :meth:`set_reference` (images, or their
    embeddings from :class:`metrics.ReferenceCache`); or pass ``reference=`` to
    ``update`` to score several concepts into one mean.
    """

    def __init__(self, backbone: ImageBackbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.reference: torch.Tensor | None = None  # (M, D) unit embeddings, not a synced state

    def set_reference(self, images=None, embeddings: torch.Tensor | None = None) -> None:
        if (images is None) == (embeddings is None):
            raise ValueError("set_reference takes either images or embeddings.")
        self.reference = self.backbone.embed_images(images) if embeddings is None else embeddings

    def update(self, images=None, reference: torch.Tensor | None = None, embeddings: torch.Tensor | None = None) -> None:
        ref = self.reference if reference is None else reference
        if ref is None:
            raise RuntimeError(
                f"{type(self).__name__} has no real images to compare with: call set_reference(images) "
                "for the concept first, or pass reference= to update."
            )
        gen = self.backbone.embed_images(images) if embeddings is None else embeddings  # (N, D)
        ref = ref.to(gen.device, gen.dtype)  # (M, D)
        self._add((gen @ ref.T).mean(dim=1))  # (N,): each image's mean over the M real images


class CLIPImageSimilarity(ImageSimilarity):
    """CLIP-I. ``backbone``: a :class:`metrics.ClipBackbone`."""


class DINOSimilarity(ImageSimilarity):
    """DINO image similarity. ``backbone``: a :class:`metrics.DinoBackbone`."""


class CLIPTextSimilarity(_SumCount):
    """CLIP-T: mean cosine similarity of each image with its own text."""

    def __init__(self, backbone: ClipBackbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def update(self, images=None, texts: Sequence[str] = (), embeddings: torch.Tensor | None = None) -> None:
        gen = self.backbone.embed_images(images) if embeddings is None else embeddings  # (N, D)
        if len(texts) != len(gen):
            raise ValueError(f"CLIP-T needs one text per image: got {len(texts)} texts for {len(gen)} images.")
        txt = self.backbone.embed_texts(list(texts)).to(gen.device)  # (N, D)
        self._add((gen * txt).sum(dim=-1))

