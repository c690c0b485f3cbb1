"""Prior-preservation class images, generated once with the base model and kept on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from components.atomic import atomic_path


@torch.no_grad()
def generate_class_images(
    model_source: str, folder: str | Path, prompt: str, num_images: int, start: int = 0, guidance: float = 7.5,
    steps: int = 50, resolution: int | None = None, seed: int = 0, batch_size: int = 4,
) -> list[Path]:
    """Generate images ``start .. num_images-1`` of ``prompt`` into ``folder``.

    Each image has its own seed (``seed + index``), so an interrupted run resumes where
    it stopped and produces the same images as an uninterrupted one.
    """
    from components.loader import load_components

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components = load_components(model_source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = components.pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    size = resolution or components.resolution
    written = []
    todo = list(range(start, num_images))
    for lo in tqdm(range(0, len(todo), batch_size), desc=f"class images '{prompt}'"):
        idx = todo[lo : lo + batch_size]
        gens = [torch.Generator(device).manual_seed(seed + i) for i in idx]
        images = pipe([prompt] * len(idx), height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance, generator=gens).images
        for i, im in zip(idx, images):
            path = folder / f"class_{i:05d}.png"
            with atomic_path(path) as tmp:  # a resumed run never reads a half-written image
                im.save(tmp, format="PNG")
            written.append(path)
    return written
