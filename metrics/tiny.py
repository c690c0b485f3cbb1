"""Tiny random metric backbones, saved as standard transformers folders.

Tests and the quickstart cannot download CLIP or DINO, so these build small random
models from configs and save them exactly as real ones are laid out on the hub
(weights, config, image processor config and, for CLIP, the tokenizer). They are then
loaded back through :func:`metrics.load_clip_backbone` / :func:`metrics.load_dino_backbone`,
so the real loading code is what the tests run. ``full_size=True`` builds the real
architectures (ViT-B/32 CLIP, ViT-S/16 DINO, DINOv2-S) with random weights, for
benchmarks of metric cost on a GPU without the downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from components.loader import cache_dir
from components.tokenizer import WORDS_FILE, build_tiny_tokenizer

TINY_CLIP = dict(
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    projection_dim=32,
)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)

# the real architectures, for benchmarks (random weights)
FULL_CLIP = dict(
    text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32),
    projection_dim=512,
)
FULL_VIT = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=224, patch_size=16)

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def save_tiny_clip(folder: str | os.PathLike, seed: int = 0, full_size: bool = False) -> Path:
    """A random ``CLIPModel`` + the tiny CLIP-format tokenizer + a CLIP image processor config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    spec = FULL_CLIP if full_size else TINY_CLIP
    tokenizer = build_tiny_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config={**spec["text"], **ids}, vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    size = spec["vision"]["image_size"]
    folder = Path(folder)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ).save_pretrained(folder)
    return folder


def save_tiny_dino(folder: str | os.PathLike, kind: str = "dino", seed: int = 0, full_size: bool = False) -> Path:
    """A random DINO ``ViTModel`` (square resize, as facebook/dino-vits16) or, with
    ``kind="dinov2"``, a ``Dinov2Model`` (shortest-edge resize + center crop, as DINOv2)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

    spec = dict(FULL_VIT if full_size else TINY_VIT)
    size = spec["image_size"]
    torch.manual_seed(seed)
    folder = Path(folder)
    if kind == "dino":
        ViTModel(ViTConfig(**spec), add_pooling_layer=False).save_pretrained(folder)
        ViTImageProcessor(size={"height": size, "width": size}, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder)
    elif kind == "dinov2":
        spec["patch_size"] = 14 if full_size else spec["patch_size"]
        Dinov2Model(Dinov2Config(**spec)).save_pretrained(folder)
        resize = size * 8 // 7  # DINOv2 resizes to 256 and crops 224
        BitImageProcessor(
            size={"shortest_edge": resize}, crop_size={"height": size, "width": size}, do_center_crop=True,
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        ).save_pretrained(folder)
    else:
        raise ValueError(f"Unknown DINO kind {kind!r}: choose 'dino' or 'dinov2'.")
    return folder


def tiny_backbone_folder(kind: str = "clip", seed: int = 0, full_size: bool = False) -> Path:
    """A tiny backbone folder (``"clip"``, ``"dino"`` or ``"dinov2"``) in the cache, written once."""
    spec = [TINY_CLIP, TINY_VIT, FULL_CLIP, FULL_VIT, kind, seed, full_size, WORDS_FILE.read_text()]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / f"{'full' if full_size else 'tiny'}-{kind}-{digest}"
    if not (folder / "config.json").exists():
        from components.atomic import atomic_path

        # building must not move the caller's RNG; concurrent builders: the first one wins
        with atomic_path(folder, replace=False) as tmp, torch.random.fork_rng(devices=[]):
            if kind == "clip":
                save_tiny_clip(tmp, seed, full_size)
            else:
                save_tiny_dino(tmp, kind, seed, full_size)
    return folder
