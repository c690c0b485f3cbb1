"""The three protocol metrics of one concept together: CLIP-I, CLIP-T and DINO.

:class:`ConceptMetrics` loads the backbones once, takes the concept's real images and
superclass word with :meth:`ConceptMetrics.set_concept`, and scores batches of
generated images with the templates they were sampled from. The CLIP image embedding
of a batch is computed once and shared by CLIP-I and CLIP-T.

    metrics = ConceptMetrics(clip="openai/clip-vit-base-patch32", dino="facebook/dino-vits16")
    metrics.set_concept("dreambooth/dog", superclass="dog")
    metrics.update(out.images, out.templates)        # (N, 3, H, W) in [0, 1], N templates
    metrics.compute()                                # {"clip_i": ..., "clip_t": ..., "dino": ...}
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from metrics.backbones import DEFAULT_CLIP, DEFAULT_DINO, ClipBackbone, DinoBackbone, load_clip_backbone, load_dino_backbone
from metrics.reference import ReferenceCache
from metrics.similarity import CLIPImageSimilarity, CLIPTextSimilarity, DINOSimilarity, clip_t_text

METRIC_NAMES = ("clip_i", "clip_t", "dino")


class ConceptMetrics(nn.Module):
    """CLIP-I, CLIP-T and DINO of generated images of one concept.

    Args:
        clip: CLIP hub id or folder (None: no CLIP-I / CLIP-T).
        dino: DINO / DINOv2 hub id or folder (None: no DINO).
        clip_backend: ``"transformers"`` or ``"open_clip"``.
        clip_t_mode: CLIP-T text, ``"superclass"`` (slot filled with the superclass word)
            or ``"remove"`` (slot removed).
        cache: where real-image embeddings are kept (default: in memory).
        clip_backbone / dino_backbone: already loaded backbones, used instead of loading.
        sync_on_compute: all-reduce over ranks in ``compute`` (torchmetrics' default).
            False when each rank scores different concepts (sharded evaluation).
    """

    def __init__(
        self,
        clip: str | os.PathLike | None = DEFAULT_CLIP,
        dino: str | os.PathLike | None = DEFAULT_DINO,
        clip_backend: str = "transformers",
        clip_t_mode: str = "superclass",
        cache: ReferenceCache | None = None,
        clip_backbone: ClipBackbone | None = None,
        dino_backbone: DinoBackbone | None = None,
        sync_on_compute: bool = True,
    ):
        super().__init__()
        clip_t_text("a {}", "x", clip_t_mode)  # validate the mode before loading anything
        self.clip_t_mode = clip_t_mode
        self.cache = cache if cache is not None else ReferenceCache()
        if clip_backbone is None and clip is not None:
            clip_backbone = load_clip_backbone(clip, backend=clip_backend)
        if dino_backbone is None and dino is not None:
            dino_backbone = load_dino_backbone(dino)
        self.metrics = nn.ModuleDict()
        kw = dict(sync_on_compute=sync_on_compute)
        if clip_backbone is not None:
            self.metrics["clip_i"] = CLIPImageSimilarity(clip_backbone, **kw)
            self.metrics["clip_t"] = CLIPTextSimilarity(clip_backbone, **kw)
        if dino_backbone is not None:
            self.metrics["dino"] = DINOSimilarity(dino_backbone, **kw)
        if not self.metrics:
            raise ValueError("ConceptMetrics needs a CLIP or a DINO backbone: both clip and dino are None.")
        self.superclass: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.metrics.keys())

    def set_concept(self, real_images, superclass: str) -> None:
        """Real images (a folder, a (M, 3, H, W) batch or a list of (3, H, W) in [0, 1]) and
        the superclass word of the concept. Resets the running values."""
        for name in ("clip_i", "dino"):
            if name in self.metrics:
                self.metrics[name].set_reference(embeddings=self.cache.get(self.metrics[name].backbone, real_images))
        self.superclass = superclass
        self.reset()

    @torch.no_grad()
    def update(self, images: torch.Tensor, templates: Sequence[str]) -> None:
        """Generated images (N, 3, H, W) in [0, 1] and the N templates they were sampled from."""
        if self.superclass is None:
            raise RuntimeError("Call set_concept(real_images, superclass) before update.")
        if len(templates) != len(images):
            raise ValueError(f"update needs one template per image: got {len(templates)} for {len(images)} images.")
        if "clip_i" in self.metrics:
            clip_emb = self.metrics["clip_i"].backbone.embed_images(images)  # (N, D), shared by CLIP-I and CLIP-T
            self.metrics["clip_i"].update(embeddings=clip_emb)
            texts = [clip_t_text(t, self.superclass, self.clip_t_mode) for t in templates]
            self.metrics["clip_t"].update(texts=texts, embeddings=clip_emb)
        if "dino" in self.metrics:
            self.metrics["dino"].update(images)

    def compute(self) -> dict[str, float]:
        """Mean of each metric over all images seen (on all ranks, when distributed)."""
        return {name: float(m.compute()) for name, m in self.metrics.items()}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
