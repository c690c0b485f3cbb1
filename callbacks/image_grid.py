"""A basic validation callback: sample the validation prompts and log one image grid.

It uses the diffusers pipeline of the module's components with classifier-free guidance
on the concept prompt (the full sampler-and-metrics callback is
:class:`callbacks.sampling.SamplerValidation`). Images are logged as uint8 (float images
come out black in offline W&B runs) and also written as PNG files next to the logs.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from components.personalized import concept_prompt


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows·(H+pad)+pad, cols·(W+pad)+pad, 3) uint8 grid, row-major."""
    n, h, w, _ = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[k]
    return grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def log_grid(trainer: L.Trainer, key: str, grid: np.ndarray, caption: str, step: int,
             log_dir: str | Path | None = None) -> Path | None:
    """Log a uint8 grid to every logger that takes images, and save it as a PNG.

    ``log_dir``: where the PNG goes (default ``trainer.log_dir``). ``trainer.log_dir`` is a
    collective under DDP (it broadcasts), so callers logging from rank 0 only must read it
    on every rank first and pass it here.
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[Image.fromarray(grid)], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step, dataformats="HWC")
    out_dir = Path(log_dir or trainer.log_dir or trainer.default_root_dir) / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{key.replace('/', '_')}_step{step:06d}.png"
    Image.fromarray(grid).save(path)
    return path


class ImageGridLogger(L.Callback):
    """Every ``every_n_epochs`` validation epochs, sample ``num_prompts`` validation prompts
    × ``num_images`` seeds and log the grid under ``val/images``.

    Args:
        num_prompts: rows of the grid (first validation prompts of the DataModule).
        num_images: columns (image seeds ``seed``, ``seed + 1``, ...).
        num_steps: DDIM steps; guidance_scale: classifier-free guidance ω.
        seed: base seed: the same seeds every time, so grids are comparable across steps.
        every_n_epochs: how often (in validation epochs).
    """

    def __init__(self, num_prompts: int = 4, num_images: int = 2, num_steps: int = 25, guidance_scale: float = 7.5,
                 seed: int = 0, every_n_epochs: int = 1):
        self.num_prompts, self.num_images, self.num_steps = num_prompts, num_images, num_steps
        self.guidance_scale, self.seed, self.every_n_epochs = guidance_scale, seed, every_n_epochs
        self._count = 0

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._count += 1
        log_dir = trainer.log_dir  # a collective under DDP: read on every rank
        if not trainer.is_global_zero or (self._count - 1) % self.every_n_epochs:
            return
        templates = getattr(trainer.datamodule, "validation_templates", None) or ["a photo of {}"]
        prompts = [concept_prompt(pl_module, t) for t in templates[: self.num_prompts]]
        images = self.sample(pl_module, prompts)
        grid = make_grid(to_uint8(images), rows=len(prompts))
        log_grid(trainer, "val/images", grid, " | ".join(prompts), trainer.global_step, log_dir=log_dir)

    def sample(self, pl_module, prompts: list[str]) -> torch.Tensor:
        c = pl_module.components
        pipe = c.pipeline()
        pipe.set_progress_bar_config(disable=True)
        rng_state = torch.get_rng_state()
        try:
            embeds = pl_module.encode_prompts([p for p in prompts for _ in range(self.num_images)])
            negative = pl_module.encode_prompts([""] * len(embeds))
            gens = [torch.Generator(pl_module.device).manual_seed(self.seed + j) for _ in prompts for j in range(self.num_images)]
            inputs = c.backbone.pipeline_inputs(embeds, negative)  # the family's pipeline arguments
            out = pipe(**inputs, num_inference_steps=self.num_steps,
                       guidance_scale=self.guidance_scale, generator=gens, output_type="pt", height=c.resolution,
                       width=c.resolution)
        finally:
            torch.set_rng_state(rng_state)
        return out.images  # (N, 3, H, W) in [0, 1]
