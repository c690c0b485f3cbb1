"""The validation grid (callbacks.ImageGridLogger) is a thin use of the samplers: its PNG
holds the concept sampler's images (the same code as sample.py), any registered sampler
can draw it, and a HiFi step-wise model's grid uses the step-wise embeddings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.image_grid import ImageGridLogger
from components.pixels import make_grid, to_uint8
from components.personalized import concept_prompt
from conftest import build
from lightning_modules import DreamBooth, HiFiTextualInversion
from samplers import build_sampler


def fake_trainer(tmp_path: Path, datamodule) -> SimpleNamespace:
    return SimpleNamespace(sanity_checking=False, log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                           is_global_zero=True, datamodule=datamodule, global_step=7, loggers=[])


def test_grid_png_holds_the_concept_samplers_images(tmp_path, demo_dm):
    module = build(DreamBooth, pretrained_model="tiny", placeholder="sks", superclass="ball", learning_rate=1e-2)
    demo_dm.setup("fit")
    templates = demo_dm.validation_templates[:2]
    callback = ImageGridLogger(num_prompts=2, num_images=2, num_steps=3, guidance_scale=5.0, seed=3)
    module.train()
    callback.on_validation_epoch_end(fake_trainer(tmp_path, demo_dm), module)
    assert module.training  # the module's modes are kept

    png = np.asarray(Image.open(tmp_path / "images" / "val_images_step000007.png"))
    ref = build_sampler("concept", num_steps=3, guidance=5.0).sample(module, templates, num_images=2, seed=3)
    assert ref.images.shape[0] == 4
    np.testing.assert_array_equal(png, make_grid(to_uint8(ref.images), rows=2))
    other = build_sampler("concept", num_steps=3, guidance=1.0).sample(module, templates, num_images=2, seed=3)
    assert not np.array_equal(png, make_grid(to_uint8(other.images), rows=2))  # the guidance scale is used


def test_any_registered_sampler_draws_the_grid():
    module = build(DreamBooth, pretrained_model="tiny", placeholder="sks", superclass="ball", learning_rate=1e-2)
    callback = ImageGridLogger(num_images=1, num_steps=4, sampler={"sampler": "mixed", "guidance_concept": 2.0})
    assert callback.sampler.name == "mixed" and callback.sampler.num_steps == 4
    images = callback.sample(module, ["a {} on the beach"])
    ref = build_sampler("mixed", num_steps=4, guidance_concept=2.0).sample(module, ["a {} on the beach"], num_images=1)
    assert torch.equal(images, ref.images)
    with pytest.raises(ValueError, match="unknown setting"):
        ImageGridLogger(sampler={"sampler": "mixed", "guidance_scale": 2.0})
    with pytest.raises(ValueError, match="unknown sampler"):
        ImageGridLogger(sampler="nope")


class FixedEmbeddings:
    """A step-wise model seen without its timesteps: c_s at every step (what the old
    pipeline-based grid drew)."""

    timestep_dependent = False

    def __init__(self, module):
        self.module, self.components = module, module.components
        self.superclass, self.concept_phrase = module.superclass, module.concept_phrase

    def encode_prompts(self, prompts, timestep=None):
        return self.module.encode_prompts(prompts, None)

    def prompt_tokens(self, prompt):
        return self.module.prompt_tokens(prompt)

    def concept_token_positions(self, template):
        return self.module.concept_token_positions(template)


def test_a_hifi_step_wise_grid_uses_the_step_wise_embeddings():
    module = build(HiFiTextualInversion, pretrained_model="tiny", placeholder="sks", superclass="ball",
                   learning_rate=1e-2, global_steps=1, num_ddim_steps=3, steps_per_timestep=1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        module.embeddings.copy_(torch.randn(module.embeddings.shape, generator=g) * 3)
        module.phases_started.fill_(3)  # every step-wise embedding trained (and different from c_s)
    assert module.timestep_dependent
    callback = ImageGridLogger(num_images=1, num_steps=3)
    images = callback.sample(module, ["a photo of {}"])
    stepwise = build_sampler("concept", num_steps=3, guidance=7.5).sample(module, ["a photo of {}"])
    fixed = build_sampler("concept", num_steps=3, guidance=7.5).sample(FixedEmbeddings(module), ["a photo of {}"])
    assert torch.equal(images, stepwise.images)
    assert (images - fixed.images).abs().max() > 1e-3
    assert "sks" in concept_prompt(module, "a photo of {}")


def _fit_with(tmp_path, callbacks):
    """One epoch of DreamBooth on the demo concept (2 steps, one validation), TensorBoard
    logging; returns the image keys the logger received, in order."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules.concept import ConceptDataModule

    L.seed_everything(0)
    dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=2, repeats=1, validation_prompts="object")
    model = DreamBooth(pretrained_model="tiny", superclass=dm.superclass, learning_rate=1e-4)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    keys = []
    add_image = logger.experiment.add_image
    logger.experiment.add_image = lambda key, *a, **k: (keys.append(key), add_image(key, *a, **k))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, callbacks=callbacks, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    return keys


def test_with_sampler_validation_the_grid_is_rendered_once(tmp_path, monkeypatch):
    """configs/base.yaml + --trainer.callbacks+=callbacks.SamplerValidation: ImageGridLogger
    hands val/images to SamplerValidation's concept grid (its grid_aliases, as the
    quickstart does) and renders nothing; alone, or with defer=false, it renders its own."""
    from callbacks.sampling import SamplerValidation

    def validation():
        return SamplerValidation(samplers=[{"sampler": "concept", "num_steps": 2}], clip="tiny", dino="tiny",
                                 num_prompts=2, num_images=2, every_n_epochs=1)

    rendered = []
    real_sample = ImageGridLogger.sample
    monkeypatch.setattr(ImageGridLogger, "sample", lambda self, *a: rendered.append(1) or real_sample(self, *a))
    grid, sv = ImageGridLogger(num_prompts=2, num_images=2, num_steps=2), validation()
    seen = []
    real_log_grid = sv._reduce_and_log
    monkeypatch.setattr(sv, "_reduce_and_log", lambda *a: seen.append(dict(sv.grid_aliases)) or real_log_grid(*a))
    keys = _fit_with(tmp_path / "both", [grid, sv])
    assert grid.deferred_to == "concept" and seen == [{"concept": "val/images"}]
    assert sv.grid_aliases == {}  # taken back at teardown: the callback reused alone logs no val/images
    assert rendered == [] and keys == ["val/concept/grid", "val/images"]  # one render, logged under both keys
    pngs = [p.name for p in (tmp_path / "both" / "tb" / "version_0" / "images").iterdir()]
    assert len(pngs) == 1 and pngs[0].startswith("val_concept_grid_step")  # no val_images_step*.png

    keys = _fit_with(tmp_path / "alone", [ImageGridLogger(num_prompts=2, num_images=2, num_steps=2)])
    assert rendered == [1] and keys == ["val/images"]
    grid, sv = ImageGridLogger(num_prompts=2, num_images=2, num_steps=2, defer=False), validation()
    keys = _fit_with(tmp_path / "own", [grid, sv])
    assert grid.deferred_to is None and sv.grid_aliases == {} and rendered == [1, 1]
    assert sorted(keys) == ["val/concept/grid", "val/images"]
    # another sampler than the grid's is no stand-in
    grid = ImageGridLogger(num_prompts=2, num_images=2, num_steps=2, sampler="mixed")
    grid.setup(SimpleNamespace(callbacks=[grid, validation()]), None, "fit")
    assert grid.deferred_to is None
