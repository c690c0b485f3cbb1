"""The concept DataModule: layouts, transforms, prior images, and every documented error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.concept import ConceptDataError, ConceptDataModule, collate
from datamodules.prompts import DREAMBOOTH_LIVE_PROMPTS, DREAMBOOTH_OBJECT_PROMPTS
from datamodules.synthetic import draw_demo_image

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "dreambooth"


def write_concept(folder: Path, n: int = 3, size: int = 40, masks: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = draw_demo_image(i, size)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
        if masks:
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:02d}_mask.png")
    return folder


def test_batches_hold_pixels_masks_and_templates(tmp_path):
    dm = ConceptDataModule(concept_dir=str(write_concept(tmp_path / "c")), superclass="ball", resolution=32,
                           batch_size=2, instance_template="a photo of {}")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["masks"].shape == (2, 1, 32, 32) and set(batch["masks"].unique().tolist()) == {0.0, 1.0}
    assert batch["templates"] == ["a photo of {}"] * 2 and not batch["is_prior"].any()
    assert all(batch["cache_keys"])  # center crop, no flip: deterministic pixels, cacheable


def test_mask_follows_crop_and_flip(tmp_path):
    dm = ConceptDataModule(concept_dir=str(write_concept(tmp_path / "c", n=1)), superclass="ball", resolution=32,
                           center_crop=False, random_flip=True, repeats=8)
    dm.setup("fit")
    for k in range(8):
        ex = dm.train_set[k]
        # red/yellow ball pixels are exactly where the mask is: red channel high, blue low
        px = (ex["pixel_values"] + 1) * 127.5
        ball = (px[0] > 150) & (px[2] < 90)
        inside = ex["masks"][0] > 0.5
        assert (ball & ~inside).float().mean() < 0.02
        assert ex["cache_keys"] == ""  # random crops are not cached


def test_epoch_order_is_reproducible(demo_dm):
    demo_dm.hparams.repeats = 1
    demo_dm.setup("fit")
    loader = demo_dm.train_dataloader()
    loader.sampler.set_epoch(3)
    first = list(loader.sampler)
    loader.sampler.set_epoch(4)
    other = list(loader.sampler)
    loader.sampler.set_epoch(3)
    assert list(loader.sampler) == first and sorted(first) == sorted(other) == list(range(5))


def test_prior_images_pair_with_instances(tmp_path):
    write_concept(tmp_path / "class", n=4, masks=False)
    dm = ConceptDataModule(concept_dir=str(write_concept(tmp_path / "c")), superclass="ball", resolution=32,
                           class_dir=str(tmp_path / "class"), num_class_images=4, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["pixel_values"].shape[0] == 4


def test_class_images_are_generated_once_and_resume(tmp_path):
    dm = ConceptDataModule(concept_dir=str(write_concept(tmp_path / "c")), superclass="ball", resolution=32,
                           class_dir=str(tmp_path / "class"), num_class_images=3, class_model="tiny", class_steps=2)
    dm.prepare_data()
    files = sorted((tmp_path / "class").glob("*.png"))
    assert len(files) == 3
    first = np.asarray(Image.open(files[2]))
    files[2].unlink()  # an interrupted run: the missing image is made again, identically
    dm.prepare_data()
    assert np.array_equal(np.asarray(Image.open(files[2])), first)
    mtime = files[0].stat().st_mtime_ns
    dm.prepare_data()  # nothing missing: nothing regenerated
    assert files[0].stat().st_mtime_ns == mtime


def test_validation_prompts_follow_the_superclass(tmp_path):
    folder = str(write_concept(tmp_path / "c"))
    assert ConceptDataModule(concept_dir=folder, superclass="dog", resolution=32).validation_templates == DREAMBOOTH_LIVE_PROMPTS
    assert ConceptDataModule(concept_dir=folder, superclass="teapot", resolution=32).validation_templates == DREAMBOOTH_OBJECT_PROMPTS
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\na {} on the moon\n\na {} in space\n")
    dm = ConceptDataModule(concept_dir=folder, superclass="dog", resolution=32, validation_prompts=str(prompts))
    assert dm.validation_templates == ["a {} on the moon", "a {} in space"]


@pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="DreamBooth dataset not present")
def test_dreambooth_layout_fills_class_and_prompt_set():
    dm = ConceptDataModule(dreambooth_root=str(DREAMBOOTH), subject="dog6", resolution=64)
    assert dm.superclass == "dog" and dm.validation_templates == DREAMBOOTH_LIVE_PROMPTS
    assert len(dm.concept_images) >= 4
    dm = ConceptDataModule(dreambooth_root=str(DREAMBOOTH), subject="bear_plushie", resolution=64)
    assert dm.superclass == "stuffed animal" and dm.validation_templates == DREAMBOOTH_OBJECT_PROMPTS


# ------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(ConceptDataError, match="does not exist"):
        ConceptDataModule(concept_dir=str(tmp_path / "nope"), superclass="dog")


def test_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConceptDataError, match="holds no images"):
        ConceptDataModule(concept_dir=str(tmp_path), superclass="dog")


def test_unreadable_image(tmp_path):
    write_concept(tmp_path, n=2)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConceptDataError, match="Cannot read image .*broken.jpg"):
        ConceptDataModule(concept_dir=str(tmp_path), superclass="ball", resolution=32)


def test_too_small_image(tmp_path):
    write_concept(tmp_path, n=2, size=40)
    with pytest.raises(ConceptDataError, match="smaller than the training resolution 64"):
        ConceptDataModule(concept_dir=str(tmp_path), superclass="ball", resolution=64)
    ConceptDataModule(concept_dir=str(tmp_path), superclass="ball", resolution=64, allow_upscale=True)


def test_mask_without_image(tmp_path):
    write_concept(tmp_path, n=2)
    Image.new("L", (40, 40)).save(tmp_path / "07_mask.png")
    with pytest.raises(ConceptDataError, match="Mask\\(s\\) with no image: .*07_mask.png"):
        ConceptDataModule(concept_dir=str(tmp_path), superclass="ball", resolution=32)


def test_mask_of_another_size(tmp_path):
    write_concept(tmp_path, n=2)
    Image.new("L", (20, 40)).save(tmp_path / "01_mask.png")
    with pytest.raises(ConceptDataError, match="20x40 but its image .* is 40x40"):
        ConceptDataModule(concept_dir=str(tmp_path), superclass="ball", resolution=32)


def test_masks_required_but_missing(tmp_path):
    write_concept(tmp_path, n=2, masks=False)
    with pytest.raises(ConceptDataError, match="Masks were asked for"):
        ConceptDataModule(concept_dir=str(tmp_path), superclass="ball", resolution=32, use_masks=True)


@pytest.mark.parametrize("superclass", ["", "   ", None])
def test_empty_superclass(tmp_path, superclass):
    write_concept(tmp_path, n=2)
    with pytest.raises(ConceptDataError, match="superclass word is empty"):
        ConceptDataModule(concept_dir=str(tmp_path), superclass=superclass, resolution=32)


def test_placeholder_already_in_vocabulary_for_new_token_methods():
    from lightning_modules import TextualInversion

    with pytest.raises(ValueError, match="already a token of the tokenizer"):
        TextualInversion(pretrained_model="tiny", placeholder="dog", superclass="dog").configure_model()


def test_collate_keeps_instances_before_priors():
    ex = lambda prior: {"pixel_values": torch.zeros(3, 4, 4), "masks": torch.ones(1, 4, 4), "templates": "{}",
                        "is_prior": prior, "cache_keys": ""}
    a, b = ex(False), ex(False)
    a["prior"], b["prior"] = ex(True), ex(True)
    assert collate([a, b])["is_prior"].tolist() == [False, False, True, True]


def test_miniworld_concept_source_and_folder_prompts(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path))
    from miniworld import CONCEPTS, PROMPTS

    dm = ConceptDataModule(concept_dir="miniworld:green_dotted_cube", resolution=32, use_masks=True)
    assert dm.superclass == CONCEPTS["green_dotted_cube"].superclass == "cube"
    assert len(dm.concept_images) == 5 and all(c.mask is not None for c in dm.concept_images)
    assert dm.validation_templates == list(PROMPTS)  # the folder's own prompts.txt
    with pytest.raises(ConceptDataError, match="Unknown MiniWorld concept 'nope'"):
        ConceptDataModule(concept_dir="miniworld:nope", resolution=32)
    dm = ConceptDataModule(concept_dir="miniworld:green_dotted_cube:varied:6", resolution=32)
    assert len(dm.concept_images) == 6 and '"context": "varied"' in (Path(dm.concept_dir) / "concept.json").read_text()
    with pytest.raises(ConceptDataError, match="neither a context"):
        ConceptDataModule(concept_dir="miniworld:green_dotted_cube:kitchen", resolution=32)
