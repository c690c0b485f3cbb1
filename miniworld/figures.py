"""A before/after picture of a fine-tuned MiniWorld artifact (``python -m miniworld before-after``).

Rows, top to bottom: the concept's training views (when given), the base model asked for the
concept phrase ("a sks ball on the beach": before fine-tuning), the artifact's concept
sampler and its superclass sampler (after), over the first MiniWorld prompts with the same
x_T in every row. The README's quickstart picture is made this way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _label(strip: np.ndarray, text: str, width: int) -> np.ndarray:
    """``strip`` with a white label column of ``width`` pixels on its left."""
    from PIL import Image, ImageDraw

    label = Image.new("RGB", (width, strip.shape[0]), "white")
    ImageDraw.Draw(label).multiline_text((4, 4), text, fill="black", spacing=2)
    return np.concatenate([np.asarray(label), strip], axis=1)


def before_after(artifact: str | Path, out: str | Path, concept: str | None = None, num_prompts: int = 8,
                 num_images: int = 2, num_steps: int = 25, guidance: float | None = None, seed: int = 0, scale: int = 3,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """Write the picture to ``out`` (PNG); return its rows (``views`` when ``concept`` is
    given, ``before``, ``concept``, ``superclass``: (N, 3, H, W) in [0, 1], prompt-major).
    Each prompt is a column of ``num_images`` images per row; ``concept`` (a concept source
    such as ``miniworld:orange_checkered_ball:scene:20``) adds a row of its first training views;
    ``guidance`` sets the concept rows' (before and after) classifier-free guidance."""
    from PIL import Image

    from components.pixels import make_grid, to_uint8
    from lightning_modules.base import read_artifact_manifest
    from lightning_modules.loading import check_model, load_model
    from miniworld.concepts import PROMPTS
    from samplers import build_sampler

    check_model(None, [str(artifact)], num_steps=num_steps)  # a broken artifact fails before anything loads
    if concept is not None:  # so does an unknown concept
        from components.pixels import pil_to_tensor
        from datamodules.concept import load_concept_folder
        from datamodules.sources import resolve_source

        source = resolve_source(concept)
        items = load_concept_folder(source.folder if source is not None else concept)
    manifest = read_artifact_manifest(artifact)
    templates = list(PROMPTS[:num_prompts])
    after = load_model(None, str(artifact), device=device)
    before = load_model(manifest["pretrained_model"], superclass=manifest["superclass"],
                        placeholder=manifest["placeholder"], device=device)
    phrase = f"{manifest['placeholder']} {manifest['superclass']}"
    rows = []  # (name, label, (num_images * n, 3, H, W) in [0, 1], prompt-major)
    if concept is not None:
        size = after.components.unet.config.sample_size * 2 ** (len(after.components.vae.config.block_out_channels) - 1)
        views = [pil_to_tensor(c.image.convert("RGB").resize((size, size))) for c in items[: num_prompts * num_images]]
        rows.append(("views", "training\nviews", torch.stack(views)))
    for name, label, model, sampler in (("before", f"before:\nbase model,\n'{phrase}'", before, "concept"),
                                        ("concept", "after:\nconcept\nsampler", after, "concept"),
                                        ("superclass", "after:\nsuperclass\nsampler", after, "superclass")):
        extra = {"guidance": guidance} if guidance is not None and sampler == "concept" else {}
        s = build_sampler(sampler, num_steps=num_steps, **extra)
        rows.append((name, label, s.sample(model, templates, num_images=num_images, seed=seed, batch_size=16).images))
    strips = []
    for _, label, images in rows:
        n = images.shape[0]
        # prompt-major (p0 i0, p0 i1, p1 i0, ...) -> a strip of num_images rows, one column per prompt
        cols = -(-n // num_images)
        order = [p * num_images + i for i in range(num_images) for p in range(cols) if p * num_images + i < n]
        pixels = to_uint8(images[order])
        if scale > 1:
            pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        strips.append(_label(make_grid(pixels, rows=num_images), label, width=110))
    # a header over the sampled rows: each column's prompt, without "a {}"
    cell = strips[0].shape[1] - 110
    header = np.full((30, strips[0].shape[1], 3), 255, dtype=np.uint8)
    from PIL import ImageDraw

    head = Image.fromarray(header)
    draw = ImageDraw.Draw(head)
    step = (cell - 2) / max(len(templates), 1)
    for k, t in enumerate(templates):
        words = t.replace("{}", "").split()[1:]  # "a {} on the beach" -> on the beach
        half = (len(words) + 1) // 2
        draw.multiline_text((110 + 4 + k * step, 2), " ".join(words[:half]) + "\n" + " ".join(words[half:]),
                            fill="black", spacing=1)
    strips.insert(1 if concept is not None else 0, np.asarray(head))  # above the sampled rows
    width = max(s.shape[1] for s in strips)
    sheet = np.concatenate([np.pad(s, ((0, 6), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    return {name: images for name, _, images in rows}
