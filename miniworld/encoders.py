"""Tiny encoders for the metrics, trained on MiniWorld.

- CLIP-like (:func:`train_clip`): a transformers ``CLIPModel`` (32 px ViT with 4 px
  patches, a small text transformer) trained with CLIP's symmetric contrastive loss on
  world images and their captions. Saved with its tokenizer and a
  ``CLIPImageProcessor`` in one folder, as a real CLIP checkpoint is: it drives CLIP-I
  and CLIP-T.
- DINO-like (:func:`train_dino`): a transformers ``ViTModel`` whose CLS token is trained
  for object identity: two images of the same (shape, colour, pattern) in different
  scenes, places and finishes are a positive pair, all other images of the batch are
  negatives (NT-Xent). Saved with a ``ViTImageProcessor``: it drives the DINO score.

Both processors normalise with mean = std = 0.5, i.e. pixels in [-1, 1], as in training.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor, ViTModel

from components.tokenizer import build_tiny_tokenizer
from miniworld.data import rendered, spec_of, to_tensor
from miniworld.loop import train
from miniworld.scenes import SCENES
from miniworld.world import COLOUR_NAMES, SCENE_NAMES, SHAPE_NAMES, ObjectSpec, World

MEAN_STD = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric cross-entropy over the cosine-similarity matrix; row i matches column i."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# --------------------------------------------------------------------------- CLIP


def build_clip(size: int = 32, seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=size, patch_size=4, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=64,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         **MEAN_STD)
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tok)


def clip_embed_text(model: CLIPModel, tokenizer, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding=True, return_tensors="pt")
    return model.get_text_features(**ids).pooler_output


def clip_embed_images(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    return model.get_image_features(pixel_values=pixels).pooler_output


def train_clip(out: str | Path, seed: int = 0, num_images: int = 40000, size: int = 32, steps: int = 3000,
               batch_size: int = 128, lr: float = 1e-3) -> CLIPModel:
    """Contrastive training on ``World(seed)`` (captions redrawn each step); saves to ``out``."""
    model, processor = build_clip(size, seed)
    tok = processor.tokenizer
    data = rendered(seed, num_images, size)
    images, world = to_tensor(data["images"]), World(seed, size)
    rng = np.random.default_rng(seed)

    def step(_: int) -> dict[str, torch.Tensor]:
        idx = rng.choice(len(images), batch_size, replace=False)
        captions = [world.caption(*spec_of(data["labels"][i]), rng) for i in idx]
        img = clip_embed_images(model, images[idx])
        txt = clip_embed_text(model, tok, captions)
        return {"loss": info_nce(img, txt, model.logit_scale.exp().clamp(max=100))}

    train("clip", model.parameters(), step, steps, lr, weight_decay=0.1)
    model.eval()
    out = Path(out)
    model.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, as CLIP checkpoints have
    tok.save_pretrained(out)
    print("clip held-out retrieval:", " ".join(f"{k} {100 * v:.1f}%" for k, v in clip_retrieval(model, tok, seed + 1).items()))
    return model


@torch.no_grad()
def clip_retrieval(model: CLIPModel, tokenizer, seed: int = 1, n: int = 1000, size: int = 32) -> dict[str, float]:
    """Zero-shot retrieval on held-out renders of ``World(seed)`` (see :func:`clip_zero_shot`)."""
    data = rendered(seed, 2000, size)
    specs = [spec_of(row) for row in data["labels"][:n]]
    return clip_zero_shot(model, tokenizer, to_tensor(data["images"][:n]), [o for o, _ in specs], [s for _, s in specs])


@torch.no_grad()
def clip_zero_shot(model: CLIPModel, tokenizer, images: torch.Tensor, objects: list[ObjectSpec],
                   scenes: list[str]) -> dict[str, float]:
    """How often the right caption wins among captions that differ in one attribute: the
    scene (the 20 scene captions of the image's object), the shape word, the colour word.
    ``images`` (N, 3, H, W) in [-1, 1]."""
    model.eval()
    img = F.normalize(torch.cat([clip_embed_images(model, b) for b in images.split(256)]), dim=-1)
    hits = {"scene": [], "shape": [], "colour": []}
    for i, (obj, scene) in enumerate(zip(objects, scenes)):
        candidates = {
            "scene": [f"a {obj.phrase()} {SCENES[s][0]}" for s in SCENE_NAMES],
            "shape": [f"a {obj.phrase(noun=s)} {SCENES[scene][0]}" for s in SHAPE_NAMES],
            "colour": [f"a {replace(obj, colour=c).phrase()} {SCENES[scene][0]}" for c in COLOUR_NAMES],
        }
        truth = {"scene": SCENE_NAMES.index(scene), "shape": SHAPE_NAMES.index(obj.shape),
                 "colour": COLOUR_NAMES.index(obj.colour)}
        for k, caps in candidates.items():
            txt = F.normalize(clip_embed_text(model, tokenizer, caps), dim=-1)
            hits[k].append(int((txt @ img[i]).argmax()) == truth[k])
    return {k: float(np.mean(v)) for k, v in hits.items()}


# --------------------------------------------------------------------------- DINO


def build_dino(size: int = 32, seed: int = 0) -> tuple[ViTModel, ViTImageProcessor]:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=size, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128)
    processor = ViTImageProcessor(size={"height": size, "width": size}, **MEAN_STD)
    return ViTModel(config, add_pooling_layer=False), processor


def dino_embed(model: ViTModel, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token, as the DINO score reads it


def identities(labels: np.ndarray) -> np.ndarray:
    """One integer per (shape, colour, pattern) from label rows."""
    return (labels[:, 1].astype(np.int64) * 64 + labels[:, 2] * 8 + labels[:, 3])


def train_dino(out: str | Path, seed: int = 0, num_images: int = 40000, size: int = 32, steps: int = 3000,
               batch_size: int = 64, lr: float = 1e-3, temperature: float = 0.1) -> ViTModel:
    """Identity-contrastive training: ``batch_size`` identities, two views each."""
    model, processor = build_dino(size, seed)
    data = rendered(seed, num_images, size)
    images, ids = to_tensor(data["images"]), identities(data["labels"])
    by_id = {k: np.flatnonzero(ids == k) for k in np.unique(ids)}
    keys = np.array([k for k in sorted(by_id) if len(by_id[k]) > 1])  # identities with two views
    if len(keys) < batch_size:
        raise ValueError(f"Only {len(keys)} identities have two images; render more or lower batch_size.")
    rng = np.random.default_rng(seed)

    def step(_: int) -> dict[str, torch.Tensor]:
        chosen = rng.choice(keys, batch_size, replace=False)
        pairs = np.array([rng.choice(by_id[k], 2, replace=False) for k in chosen])  # (B, 2)
        z = dino_embed(model, images[pairs.T.reshape(-1)])  # (2B, D): views 1 then views 2
        return {"loss": info_nce(z[:batch_size], z[batch_size:], 1 / temperature)}

    train("dino", model.parameters(), step, steps, lr, weight_decay=0.05)
    model.eval()
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print("dino held-out identity:", " ".join(f"{k} {v:.3f}" for k, v in dino_identity(model, seed + 1).items()))
    return model


@torch.no_grad()
def dino_identity(model: ViTModel, seed: int = 1, n: int = 2000, size: int = 32) -> dict[str, float]:
    """On held-out images: how often the nearest other image has the same identity, and
    the mean cosine similarity of same-identity vs different-identity pairs."""
    model.eval()
    data = rendered(seed, 2000, size)
    z = F.normalize(torch.cat([dino_embed(model, b) for b in to_tensor(data["images"][:n]).split(256)]), dim=-1)
    ids = torch.from_numpy(identities(data["labels"][:n]))
    sim = z @ z.T
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(len(z), dtype=torch.bool)
    nn_idx = sim.masked_fill(eye, -2).argmax(1)
    has_pair = (same & ~eye).any(1)
    return {
        "nn_identity_acc": float((ids[nn_idx] == ids)[has_pair].float().mean()),
        "cos_same": float(sim[same & ~eye].mean()),
        "cos_different": float(sim[~same].mean()),
    }
