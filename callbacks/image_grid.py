"""A basic validation callback: sample the validation prompts and log one image grid.

It draws through the project's samplers (:mod:`samplers`; the ``concept`` sampler, eq. 4,
by default), the same loop as ``sample.py``; the full sampler-and-metrics callback is
:class:`callbacks.sampling.SamplerValidation`. Images are logged as uint8 (float images
come out black in offline W&B runs) and also written as PNG files next to the logs.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from lightning.pytorch.utilities import rank_zero_info

from components.errors import settings_check
from components.personalized import concept_prompt
from components.pixels import make_grid, to_uint8  # noqa: F401 - re-exported (callbacks.image_grid.make_grid)

#: the key the grid is logged under (W&B's ``val/images``)
GRID_KEY = "val/images"


def log_grid(trainer: L.Trainer, key: str, grid: np.ndarray, caption: str, step: int,
             log_dir: str | Path | None = None, png: bool = True) -> Path | None:
    """Log a uint8 grid to every logger that takes images, and save it as a PNG (``png``).

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
    if not png:
        return None
    out_dir = Path(log_dir or trainer.log_dir or trainer.default_root_dir) / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{key.replace('/', '_')}_step{step:06d}.png"
    Image.fromarray(grid).save(path)
    return path


class ImageGridLogger(L.Callback):
    """Every ``every_n_epochs`` validation epochs, sample ``num_prompts`` validation prompts
    × ``num_images`` image indices with one of the project's samplers (:mod:`samplers`, the
    same code as ``sample.py``) and log the grid under ``val/images``.

    The sampler asks the module for its prompt embeddings at every DDIM step when the module
    is timestep dependent, so HiFi Tuner's step-wise embeddings show in the grid; SD, SD-XL
    and PixArt-α models all go through the same loop.

    Args:
        num_prompts: rows of the grid (first validation prompts of the DataModule).
        num_images: columns (image indices 0 ... num_images − 1 of ``seed``).
        num_steps: DDIM steps; guidance_scale: the sampler's classifier-free guidance ω
            (its ``guidance`` setting, for samplers that have one).
        seed: base seed: the same images every time, so grids are comparable across steps.
        every_n_epochs: how often (in validation epochs).
        sampler: which sampler draws the grid: a name (``concept``, the default), a sampler
            YAML path, or a mapping ``{sampler: mixed, guidance_concept: 3.5, ...}``;
            settings given there win over ``num_steps`` / ``guidance_scale``.
        batch_size: images per UNet batch.
        defer: when the trainer also has a :class:`~callbacks.sampling.SamplerValidation`
            that draws a sampler of the same name at least at every validation epoch of
            this logger (``configs/base.yaml`` with ``--trainer.callbacks+=callbacks.SamplerValidation``),
            render nothing: ``val/images`` is that sampler's grid, logged under this key too
            through its ``grid_aliases`` (as in the quickstart), so the grid is rendered once
            per validation, at SamplerValidation's prompts, seeds and settings. false: always
            render this grid.
    """

    @settings_check  # a bad setting: one line from train.py, before training
    def __init__(self, num_prompts: int = 4, num_images: int = 2, num_steps: int = 25, guidance_scale: float = 7.5,
                 seed: int = 0, every_n_epochs: int = 1, sampler: str | dict = "concept", batch_size: int = 8,
                 defer: bool = True):
        from samplers import build_sampler
        from samplers.registry import parse_sampler_spec, setting_names

        self.num_prompts, self.num_images, self.num_steps = num_prompts, num_images, num_steps
        self.guidance_scale, self.seed, self.every_n_epochs = guidance_scale, seed, every_n_epochs
        self.batch_size = batch_size
        _, name, settings = parse_sampler_spec(sampler)
        defaults = {"num_steps": num_steps}
        if "guidance" in setting_names(name):
            defaults["guidance"] = guidance_scale
        self.sampler = build_sampler(name, **{**defaults, **settings})  # bad settings fail now, before training
        self.defer = defer
        self.deferred_to: str | None = None  # the SamplerValidation entry that draws val/images instead
        self._added_alias = None  # (callback, entry name) that setup aliased, taken back in teardown
        self._count = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Hand ``val/images`` to a SamplerValidation of this trainer that draws the same
        sampler at least as often (see ``defer``)."""
        from callbacks.sampling import SamplerValidation

        self.deferred_to = None
        if not self.defer:
            return
        for callback in trainer.callbacks:
            if not (isinstance(callback, SamplerValidation) and callback.every_n_epochs
                    and self.every_n_epochs % callback.every_n_epochs == 0):
                continue
            already = [name for name, key in callback.grid_aliases.items() if key == GRID_KEY]
            if already:  # the user aliased one of its grids to val/images already
                self.deferred_to = already[0]
                return
            for entry in callback.entries:
                if entry.sampler.name == self.sampler.name and \
                        callback.grid_aliases.get(entry.name, GRID_KEY) == GRID_KEY:
                    if entry.name not in callback.grid_aliases:
                        callback.grid_aliases[entry.name] = GRID_KEY
                        self._added_alias = (callback, entry.name)
                    self.deferred_to = entry.name
                    rank_zero_info(f"ImageGridLogger: {GRID_KEY} is SamplerValidation's {entry.name!r} grid "
                                   "(rendered once per validation; ImageGridLogger(defer=false) draws its own)")
                    return

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The alias setup added goes with the run (the SamplerValidation may be reused alone)."""
        if self._added_alias is not None:
            callback, name = self._added_alias
            callback.grid_aliases.pop(name, None)
            self._added_alias = None

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.deferred_to is not None:
            return
        self._count += 1
        log_dir = trainer.log_dir  # a collective under DDP: read on every rank
        if not trainer.is_global_zero or (self._count - 1) % self.every_n_epochs:
            return
        templates = (getattr(trainer.datamodule, "validation_templates", None) or ["a photo of {}"])[: self.num_prompts]
        if hasattr(self.sampler, "use_concept") and trainer.datamodule is not None:
            self.sampler.use_concept(getattr(trainer.datamodule, "concept_dir", None))  # reference-guided
        images = self.sample(pl_module, templates)
        prompts = [concept_prompt(pl_module, t) for t in templates]
        grid = make_grid(to_uint8(images), rows=len(templates))
        log_grid(trainer, GRID_KEY, grid, " | ".join(prompts), trainer.global_step, log_dir=log_dir)

    def sample(self, model, templates: list[str]) -> torch.Tensor:
        """(len(templates)·num_images, 3, H, W) in [0, 1], template-major: the sampler's images
        of ``model`` (a PersonalizedModel) with the module's modes, dtypes and RNGs kept."""
        from callbacks.sampling import preserved_state

        module = isinstance(model, torch.nn.Module)
        with preserved_state(model) if module else nullcontext():
            if module:
                model.eval()
            out = self.sampler.sample(model, templates, num_images=self.num_images, seed=self.seed,
                                      batch_size=self.batch_size)
        return out.images

