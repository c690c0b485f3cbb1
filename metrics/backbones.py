"""Embedding backbones of the metrics: CLIP (images and text) and DINO / DINOv2 (images).

A backbone loads from a hub id or a local folder through transformers, with the image
preprocessing read from the processor config saved beside the weights
(``preprocessor_config.json``) and run in torch (:mod:`metrics.preprocess`). open_clip
is an optional backend for CLIP (``pip install 'personalize[openclip]'``; it needs
torchvision, which this project keeps out of its default install).

Every ``embed_*`` method returns L2-normalized float32 embeddings (N, D), so a cosine
similarity is a dot product.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from metrics.preprocess import ImagePreprocess

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
DINOV2_SMALL = "facebook/dinov2-small"
#: names of the tiny random backbones (metrics.tiny), for tests and CPU quickstarts
TINY_CLIP, TINY_DINO, TINY_DINOV2 = "tiny", "tiny", "tiny-dinov2"

#: images in [0, 1]: a (N, 3, H, W) batch, or a list of (3, H, W) of any sizes
Images = Union[torch.Tensor, Sequence[torch.Tensor]]


class ImageBackbone(nn.Module):
    """An image encoder with its preprocessing. Subclasses implement ``_image_features``."""

    def __init__(self, preprocess: ImagePreprocess, identity: str, batch_size: int = 64):
        super().__init__()
        self.preprocess = preprocess
        self.identity = identity  # names the weights, for the reference-embedding cache
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: Images) -> torch.Tensor:
        """Images in [0, 1] -> unit embeddings (N, D), in chunks of ``batch_size``."""
        chunks = []
        for i in range(0, len(images), self.batch_size):
            batch = images[i : i + self.batch_size]
            batch = batch.to(self.device) if isinstance(batch, torch.Tensor) else [im.to(self.device) for im in batch]
            pixels = self.preprocess(batch).to(self.dtype)  # (b, 3, h, w)
            chunks.append(F.normalize(self._image_features(pixels).float(), dim=-1))
        if not chunks:
            raise ValueError("No images to embed.")
        return torch.cat(chunks)


class ClipBackbone(ImageBackbone):
    """CLIP image and text towers (transformers ``CLIPModel`` or an open_clip model)."""

    def __init__(self, model: nn.Module, tokenizer, preprocess: ImagePreprocess, identity: str, backend: str = "transformers"):
        super().__init__(preprocess, identity)
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend

    def _image_features(self, pixel_values):
        if self.backend == "open_clip":
            return self.model.encode_image(pixel_values)
        out = self.model.get_image_features(pixel_values=pixel_values)
        # transformers >= 5 returns a model output whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> unit embeddings (N, D)."""
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            batch = list(texts[i : i + self.batch_size])
            if self.backend == "open_clip":
                feats = self.model.encode_text(self.tokenizer(batch).to(self.device))
            else:
                tok = self.tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(self.device)
                out = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
                feats = out if isinstance(out, torch.Tensor) else out.pooler_output
            chunks.append(F.normalize(feats.float(), dim=-1))
        if not chunks:
            raise ValueError("No texts to embed.")
        return torch.cat(chunks)


class DinoBackbone(ImageBackbone):
    """DINO (``ViTModel``) or DINOv2 (``Dinov2Model``): the CLS token of the last layer."""

    def __init__(self, model: nn.Module, preprocess: ImagePreprocess, identity: str):
        super().__init__(preprocess, identity)
        self.model = model
        size = preprocess.output_size
        image_size = getattr(model.config, "image_size", None)
        # ViT needs an explicit flag to accept another input size than it was trained at
        self._interpolate = model.config.model_type == "vit" and size is not None and tuple(size) != (image_size, image_size)

    def _image_features(self, pixel_values):
        kw = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.model(pixel_values=pixel_values, **kw).last_hidden_state[:, 0]  # (b, D) CLS


# --------------------------------------------------------------------------- loading


def load_clip_backbone(
    name_or_path: str | os.PathLike = DEFAULT_CLIP,
    backend: str = "transformers",
    torch_dtype: torch.dtype | None = None,
) -> ClipBackbone:
    """Load CLIP from a hub id or a folder holding a ``CLIPModel``, its tokenizer and its
    ``preprocessor_config.json`` (``"tiny"``: the tiny random one of :mod:`metrics.tiny`).
    ``backend="open_clip"`` takes an open_clip name, ``"ViT-B-32/openai"``
    (architecture/pretrained tag) or ``"hf-hub:org/repo"``."""
    if str(name_or_path) == TINY_CLIP and backend == "transformers":
        from metrics.tiny import tiny_backbone_folder

        name_or_path = tiny_backbone_folder("clip")
    if backend == "open_clip":
        return _load_open_clip(str(name_or_path))
    if backend != "transformers":
        raise ValueError(f"Unknown CLIP backend {backend!r}: choose 'transformers' or 'open_clip'.")
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    source = _check_source(name_or_path)
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type != "clip":
        raise ValueError(f"{source!r} holds a {model_type!r} model, not CLIP: pass a CLIPModel folder or hub id.")
    model = CLIPModel.from_pretrained(source, **_dtype_kw(torch_dtype)).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise FileNotFoundError(
            f"CLIP backbone {source!r} has no loadable tokenizer ({err}). Save it beside the model: "
            "tokenizer.save_pretrained(folder)."
        ) from err
    return ClipBackbone(model, tokenizer, _read_preprocess(source), _identity("transformers", source))


def load_dino_backbone(name_or_path: str | os.PathLike = DEFAULT_DINO, torch_dtype: torch.dtype | None = None) -> DinoBackbone:
    """Load DINO ViT (``facebook/dino-vits16``) or DINOv2 (``facebook/dinov2-small``) from a
    hub id or a folder holding a ``ViTModel`` / ``Dinov2Model`` and its processor config
    (``"tiny"``, ``"tiny-dinov2"``: the tiny random ones of :mod:`metrics.tiny`)."""
    from transformers import AutoConfig, AutoModel, ViTModel

    if str(name_or_path) in (TINY_DINO, TINY_DINOV2):
        from metrics.tiny import tiny_backbone_folder

        name_or_path = tiny_backbone_folder("dino" if str(name_or_path) == TINY_DINO else "dinov2")

    source = _check_source(name_or_path)
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type == "vit":
        model = ViTModel.from_pretrained(source, add_pooling_layer=False, **_dtype_kw(torch_dtype))
    elif model_type.startswith("dinov2"):
        model = AutoModel.from_pretrained(source, **_dtype_kw(torch_dtype))
    else:
        raise ValueError(
            f"{source!r} holds a {model_type!r} model: the DINO metric takes a ViTModel (DINO) or Dinov2Model "
            f"folder or hub id, e.g. {DEFAULT_DINO!r} or {DINOV2_SMALL!r}."
        )
    return DinoBackbone(model.eval().requires_grad_(False), _read_preprocess(source), _identity("transformers", source))


def _check_source(name_or_path) -> str:
    source = str(name_or_path)
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"Backbone folder {source!r} does not exist: pass a saved transformers model folder or a hub id.")
    return str(Path(source).expanduser()) if looks_local else source


def _read_preprocess(source: str) -> ImagePreprocess:
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Backbone {source!r} has no image processor config (preprocessor_config.json), so its resize, crop "
            "and normalization are unknown. Save the processor beside the model: "
            "CLIPImageProcessor(...).save_pretrained(folder) (or ViTImageProcessor / BitImageProcessor)."
        ) from err
    return ImagePreprocess.from_config(cfg)


def _identity(backend: str, source: str) -> str:
    """Backend, source and, for a folder, the weights' size and time, so a re-saved folder
    never reuses embeddings cached for its old weights."""
    path = Path(source)
    if path.is_dir():
        stamps = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in path.glob("*.safetensors"))
        stamps += sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in path.glob("*.bin"))
        return f"{backend}:{path.resolve()}:{'|'.join(stamps)}"
    return f"{backend}:{source}"


def _dtype_kw(torch_dtype):
    return {"dtype": torch_dtype} if torch_dtype is not None else {}


def _load_open_clip(name: str) -> ClipBackbone:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "The open_clip CLIP backend needs the optional extra: pip install 'personalize[openclip]' "
            "(open_clip_torch, which requires torchvision). Or use backend='transformers'."
        ) from err
    if name.startswith("hf-hub:"):
        model, _ = open_clip.create_model_from_pretrained(name)
        arch = name
    else:
        arch, _, pretrained = name.partition("/")
        model = open_clip.create_model(arch, pretrained=pretrained or None)
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size if isinstance(size, int) else int(size[0])
    if cfg.get("resize_mode", "shortest") not in ("shortest",):
        raise ValueError(f"open_clip model {name!r} uses resize_mode={cfg['resize_mode']!r}; only 'shortest' is supported.")
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(cfg.get("interpolation", "bicubic"), "bicubic")
    pre = ImagePreprocess(("shortest_edge", size), (size, size), mean, std, mode)
    model = model.eval().requires_grad_(False)
    return ClipBackbone(model, open_clip.get_tokenizer(arch), pre, f"open_clip:{name}", backend="open_clip")
