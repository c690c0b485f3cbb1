"""The three protocol metrics of one concept together: CLIP-I, CLIP-T and DINO (and, for
MiniWorld concepts, the judge's ground-truth identity and prompt accuracy).

:class:`ConceptMetrics` loads the backbones once, takes the concept's real images and
superclass word with :meth:`ConceptMetrics.set_concept`, and scores batches of
generated images with the templates they were sampled from. The CLIP image embedding
of a batch is computed once and shared by CLIP-I and CLIP-T.

    metrics = ConceptMetrics(clip="openai/clip-vit-base-patch32", dino="facebook/dino-vits16")
    metrics.set_concept("dreambooth/dog", superclass="dog")
    metrics.update(out.images, out.templates)        # (N, 3, H, W) in [0, 1], N templates
    metrics.compute()                                # {"clip_i": ..., "clip_t": ..., "dino": ...}

With ``judge="miniworld/pretrained/judge"`` it also counts MiniWorld's ground truth
(:mod:`miniworld.metrics`): ``identity`` and ``prompt`` accuracy, the concept's object read
from the ``concept.json`` of its folder (or given to ``set_concept(..., truth=)``).
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
#: the MiniWorld judge's ground-truth metrics (with ``judge=``)
JUDGE_METRIC_NAMES = ("identity", "prompt")


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
        judge / judge_model: a MiniWorld judge folder (``miniworld/pretrained/judge``) or a
            loaded judge: adds ``identity`` and ``prompt`` accuracy (MiniWorld concepts only).
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
        judge: str | os.PathLike | None = None,
        judge_model: nn.Module | None = None,
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
        if judge is not None or judge_model is not None:
            for name, metric in _judge_plugin().load_judge_metrics(judge_model if judge_model is not None else str(judge), **kw).items():
                self.metrics[name] = metric
        if not self.metrics:
            raise ValueError("ConceptMetrics needs a CLIP or a DINO backbone: both clip and dino are None.")
        self.superclass: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.metrics.keys())

    def set_concept(self, real_images, superclass: str, truth=None) -> None:
        """Real images (a folder, a (M, 3, H, W) batch or a list of (3, H, W) in [0, 1]) and
        the superclass word of the concept. Resets the running values.

        ``truth``: the concept's ground-truth ``miniworld.ObjectSpec`` for ``identity``; by
        default read from ``concept.json`` in the ``real_images`` folder."""
        for name in ("clip_i", "dino"):
            if name in self.metrics:
                self.metrics[name].set_reference(embeddings=self.cache.get(self.metrics[name].backbone, real_images))
        if "identity" in self.metrics:
            if truth is None and isinstance(real_images, (str, os.PathLike)):
                truth = _judge_plugin().read_concept_truth(real_images)
            if truth is None:
                raise ValueError(
                    "The judge's identity accuracy needs a MiniWorld concept: no concept.json with the object's ground "
                    f"truth in {real_images if isinstance(real_images, (str, os.PathLike)) else 'the concept images'}. "
                    "Write the concept with `python -m miniworld write-concept NAME FOLDER`, or leave judge unset."
                )
            self.metrics["identity"].set_truth(truth)
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
        if "identity" in self.metrics:
            pred = _judge_plugin().judge_predictions(self.metrics["identity"].judge, images)  # shared by identity and prompt
            for name in JUDGE_METRIC_NAMES:
                self.metrics[name].update(templates=list(templates), predictions=pred)

    def compute(self) -> dict[str, float]:
        """Mean of each metric over all images seen (on all ranks, when distributed); the
        judge's accuracies are shares in [0, 1]."""
        return {name: float(m.compute()) for name, m in self.metrics.items()}

    def get_state(self) -> dict:
        """The running values of every metric (to score several sampler settings in turn)."""
        return {n: ({s: getattr(m, s).clone() for s in m._defaults}, m._update_count) for n, m in self.metrics.items()}

    def set_state(self, state: dict) -> None:
        """Running values saved by :meth:`get_state`."""
        for name, (values, count) in state.items():
            m = self.metrics[name]
            for s, v in values.items():
                setattr(m, s, v.clone())
            m._update_count, m._computed = count, None

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()


#: The module of the judge metrics (MiniWorld's ground truth), named by string and imported
#: only when a judge is asked for: MiniWorld builds on metrics, not the other way round.
JUDGE_PLUGIN = "miniworld.metrics"


def _judge_plugin():
    """The judge plugin: ``load_judge_metrics``, ``judge_predictions``, ``read_concept_truth``."""
    import importlib

    return importlib.import_module(JUDGE_PLUGIN)
