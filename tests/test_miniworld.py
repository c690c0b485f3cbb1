"""MiniWorld: the world, its concepts and prompts, its data, and short runs of every trainer.

Pretraining itself never runs here: trainers run a couple of steps at tiny settings,
and the shipped pretrained models (when present) are only loaded and checked for shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from miniworld.concepts import PROMPTS, write_concept
from miniworld.draw import FINISHES, PATTERNS
from miniworld.scenes import SCENES
from miniworld.world import CONCEPTS, COLOUR_NAMES, HELD_OUT, PREFIXES, SCENE_NAMES, SHAPE_NAMES, ObjectSpec, World

PRETRAINED = Path(__file__).resolve().parents[1] / "miniworld" / "pretrained"


# --------------------------------------------------------------------------- the world


def test_sample_is_a_pure_function_of_seed_and_index():
    a, b = World(3).sample(11), World(3).sample(11)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    assert not np.array_equal(World(4).sample(11).image, a.image)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8 and a.mask.shape == (32, 32)


@pytest.mark.parametrize("size", [32, 64])
def test_every_scene_and_shape_renders_with_its_mask(size):
    world, rng = World(0, size), np.random.default_rng(0)
    for k, scene in enumerate(SCENE_NAMES):
        obj = ObjectSpec(SHAPE_NAMES[k % len(SHAPE_NAMES)], COLOUR_NAMES[k % len(COLOUR_NAMES)], PATTERNS[k % 4], FINISHES[k % 3])
        image, mask = world.render(obj, scene, rng)
        assert image.shape == (size, size, 3)
        assert 0.05 < mask.mean() < 0.6, (scene, obj)  # a large object, never the whole frame
        # the object is drawn where its mask is: the background there differs from it
        bg = World(0, size).render(obj, scene, np.random.default_rng(0))[0]
        assert image[mask].std() > 0 and bg.shape == image.shape


def test_held_out_concepts_never_sampled():
    world = World(0)
    seen = {world.random_object(world.rng(i)).identity for i in range(3000)}
    assert not seen & HELD_OUT
    assert len(seen) > 200  # all other identities do occur (8 shapes x 8 colours x 4 patterns - 5)


def test_captions_name_what_is_drawn():
    world = World(0)
    for i in range(200):
        s = world.sample(i)
        words = s.caption.split()
        assert s.obj.shape in words
        if s.obj.finish != "plain":
            assert s.obj.finish in words
        # outside the scene phrase ("a blue house"), a colour word is the object's own
        object_words = s.caption.replace(SCENES[s.scene][0], "").split()
        assert set(object_words) & set(COLOUR_NAMES) <= {s.obj.colour}


def test_every_caption_and_prompt_word_is_one_token():
    """The tiny tokenizer must keep world words whole, or text conditioning degrades."""
    from components.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    words = set(SHAPE_NAMES) | set(COLOUR_NAMES) | set(PATTERNS) | set(FINISHES) | {"shaped", "sks"}
    for phrase, _ in SCENES.values():
        words |= set(phrase.split())
    for text in list(PREFIXES) + [p.format("") for p in PROMPTS]:
        words |= set(text.split())
    split = [w for w in sorted(words) if len(tok.tokenize(w)) != 1]
    assert not split, f"not single tokens: {split}; append them to components/tokenizer_words.txt"


def test_prompt_set_mirrors_dreambooth():
    assert len(PROMPTS) == 25 and all(p.count("{}") == 1 for p in PROMPTS)
    contexts = [p.replace("a {} ", "", 1) for p in PROMPTS[:20]]
    assert contexts == [phrase for phrase, _ in SCENES.values()]  # one scene per context


# --------------------------------------------------------------------------- concepts


def test_write_concept_folder_reads_as_a_concept(tmp_path):
    folder = write_concept("blue_striped_star", tmp_path / "star", num_images=5)
    images = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_mask"))
    assert len(images) == 5
    from PIL import Image

    for p in images:
        mask = Image.open(p.with_name(p.stem + "_mask.png"))
        assert mask.mode == "L" and mask.size == Image.open(p).size
    meta = json.loads((folder / "concept.json").read_text())
    assert meta["superclass"] == "star" and meta["context"] == "scene" and set(meta["scenes"]) == {"pink_fabric"}
    varied = json.loads((write_concept("blue_striped_star", tmp_path / "v", 5, context="varied") / "concept.json").read_text())
    assert len(set(varied["scenes"])) == 5

    from datamodules.concept import ConceptDataModule

    dm = ConceptDataModule(concept_dir=str(folder), superclass=meta["superclass"], resolution=32, use_masks=True,
                           batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[1:] == (3, 32, 32) and batch["masks"].float().mean() > 0.05


def test_concept_views_are_deterministic_and_varied():
    w = World(0)
    a, b = w.render_concept("green_dotted_cube", 2), w.render_concept("green_dotted_cube", 2)
    assert np.array_equal(a.image, b.image)
    assert len({w.render_concept("green_dotted_cube", i).scene for i in range(5)}) == 5
    assert all(c.obj.colour not in ("red", "purple") for c in CONCEPTS.values())


# --------------------------------------------------------------------------- data and trainers


@pytest.fixture
def small_vae(tmp_path):
    from miniworld.vae import build_vae

    folder = tmp_path / "vae"
    build_vae().save_pretrained(folder)
    return folder


def test_datamodule_batches(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path))
    from miniworld.data import MiniWorldDataModule

    dm = MiniWorldDataModule(num_images=16, batch_size=4, val_images=4)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].min() >= -1
    assert batch["mask"].shape == (4, 1, 32, 32) and len(batch["caption"]) == 4
    assert (tmp_path / "miniworld").is_dir()  # cached for the next run


def test_pretraining_runs_and_saves_a_loadable_pipeline(monkeypatch, tmp_path, small_vae):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path))
    import lightning as L

    from components.loader import load_components
    from miniworld.data import MiniWorldDataModule
    from miniworld.pretrain import TextToImagePretraining

    small = dict(block_out_channels=(16, 32), attention_head_dim=8, cross_attention_dim=32)
    model = TextToImagePretraining(vae=str(small_vae), output_dir=str(tmp_path / "sd"), unet=small,
                                   text_encoder=dict(hidden_size=32, intermediate_size=64), save_every_n_steps=0,
                                   warmup_steps=1)
    before = [p.clone() for p in model.ema.shadow_params]
    dm = MiniWorldDataModule(num_images=8, batch_size=4, val_images=4)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.ema.shadow_params))  # EMA moved
    # the average travels in checkpoints: a fresh module that loads one saves the same EMA weights
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    again = TextToImagePretraining(vae=str(small_vae), output_dir=str(tmp_path / "sd2"), unet=small,
                                   text_encoder=dict(hidden_size=32, intermediate_size=64), seed=1)
    again.on_load_checkpoint(checkpoint)
    assert again.ema.optimization_step == 2
    ema_unet, unet_again = model.components().unet, again.components().unet
    assert all(torch.equal(a, b) for a, b in zip(ema_unet.parameters(), unet_again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ema_unet.parameters(), model.unet.parameters()))  # EMA != raw
    comps = load_components(tmp_path / "sd")
    assert comps.resolution == 32 and comps.unet.config.cross_attention_dim == 32
    images = comps.pipeline()(["a red ball on the beach"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    # continued pretraining starts from the saved pipeline's weights (and its average), not a fresh draw
    cont = TextToImagePretraining(vae=str(small_vae), output_dir=str(tmp_path / "sd3"), unet=small,
                                  text_encoder=dict(hidden_size=32, intermediate_size=64), seed=1,
                                  init_from=str(tmp_path / "sd"))
    for mine, saved in ((cont.unet, comps.unet), (cont.text_encoder, comps.text_encoders()["text_encoder"])):
        assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), saved.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(cont.ema.shadow_params, cont.trained_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(again.unet.parameters(), cont.unet.parameters()))
    from components.errors import MissingFileError

    with pytest.raises(MissingFileError, match="not a MiniWorld pipeline folder"):
        TextToImagePretraining(vae=str(small_vae), unet=small, init_from=str(tmp_path / "nope"))


def test_vae_training_sets_scaling_factor(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path))
    from diffusers import AutoencoderKL

    from miniworld import vae as vae_mod

    monkeypatch.setattr(vae_mod, "rendered", _small_rendered)
    vae_mod.train_vae(tmp_path / "vae", steps=2, batch_size=4)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.scaling_factor != 0.18215


def test_judge_trains_saves_and_loads(monkeypatch, tmp_path):
    from miniworld import judge as judge_mod

    monkeypatch.setattr(judge_mod, "rendered", _small_rendered)
    judge = judge_mod.train_judge(tmp_path / "judge", steps=2, vae=None)
    loaded = judge_mod.load_judge(tmp_path / "judge")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert all(torch.equal(judge.predict(x)[k], loaded.predict(x)[k]) for k in judge_mod.HEADS)


def test_encoders_train_and_load_through_the_metric_backbones(monkeypatch, tmp_path):
    from metrics import load_clip_backbone, load_dino_backbone
    from miniworld import encoders

    monkeypatch.setattr(encoders, "rendered", _small_rendered)
    encoders.train_clip(tmp_path / "clip", steps=2, batch_size=8)
    encoders.train_dino(tmp_path / "dino", steps=2, batch_size=4)
    clip = load_clip_backbone(str(tmp_path / "clip"))
    images = torch.rand(2, 3, 32, 32)
    assert clip.embed_images(images).shape == (2, 64) and clip.embed_texts(["a red ball"]).shape == (1, 64)
    assert load_dino_backbone(str(tmp_path / "dino")).embed_images(images).shape == (2, 64)


def _small_rendered(seed=0, n=40000, size=32, cache=True):
    """A 48-image stand-in for the cached render (each image twice, so every identity has
    two views), so trainers run in seconds."""
    from miniworld.data import render_arrays

    arrays = render_arrays(World(seed, size), 0, 24)
    return {k: np.concatenate([v, v]) for k, v in arrays.items()}


# --------------------------------------------------------------------------- shipped models


@pytest.mark.skipif(not (PRETRAINED / "sd" / "model_index.json").exists(), reason="no pretrained MiniWorld model")
def test_shipped_models_load():
    from components.loader import load_components
    from metrics import load_clip_backbone, load_dino_backbone
    from miniworld.judge import load_judge

    comps = load_components(PRETRAINED / "sd")
    assert comps.resolution == 32
    load_clip_backbone(str(PRETRAINED / "clip"))
    load_dino_backbone(str(PRETRAINED / "dino"))
    load_judge(PRETRAINED / "judge")
    total = sum(p.stat().st_size for p in PRETRAINED.rglob("*") if p.is_file())
    assert total < 20 * 2**20, f"pretrained MiniWorld models take {total / 2**20:.1f} MiB (budget 20)"


def test_quality_script_on_tiny_models(tmp_path, tiny_folder, capsys):
    from miniworld.judge import Judge
    from miniworld.quality import main, prompt_set

    prompts, truth = prompt_set(4, seed=1)
    assert prompts == prompt_set(4, seed=1)[0] and set(truth) == {"scene", "shape", "colour"}
    Judge(width=8).save(tmp_path / "judge")
    results = main(["--model", str(tiny_folder), "--judge", str(tmp_path / "judge"), "--clip", "", "--dino", "",
                    "--num-prompts", "2", "--no-prompt-set", "--num-held-out", "8", "--steps", "2", "--json", str(tmp_path / "q.json")])
    assert 0 <= results["model"]["scene"] <= 1 and json.loads((tmp_path / "q.json").read_text())["model"]
    assert set(results["model_pattern"]) == {"scene", "shape", "colour", "pattern", "identity"}
    assert results["model_pattern"]["identity"] <= min(results["model_pattern"][k] for k in ("shape", "colour", "pattern"))
    in_words = results["concepts_in_words"]
    assert set(in_words) == {*CONCEPTS, "mean"} and in_words["mean"] == pytest.approx(sum(in_words[c] for c in CONCEPTS) / 5)
    assert "judge_clean" in capsys.readouterr().out


def test_pattern_prompts_name_their_pattern_and_identity_needs_all_three():
    from miniworld.quality import concept_word_prompts, identity_accuracy, pattern_prompt_set

    prompts, truth = pattern_prompt_set(50, seed=3)
    assert set(truth) == {"scene", "shape", "colour", "pattern"} and PATTERNS.index("plain") not in truth["pattern"]
    for prompt, c, pa, sh in zip(prompts, truth["colour"], truth["pattern"], truth["shape"]):
        assert f" {COLOUR_NAMES[c]} {PATTERNS[pa]} {SHAPE_NAMES[sh]} " in prompt, prompt
    words = concept_word_prompts()
    assert words["blue_striped_star"][SCENE_NAMES.index("snow")] == "a blue striped star in the snow"
    assert all(len(v) == len(SCENE_NAMES) for v in words.values())
    t = {"shape": torch.tensor([0, 0, 0, 0]), "colour": torch.tensor([1, 1, 1, 1]), "pattern": torch.tensor([2, 2, 2, 2])}
    pred = {"shape": torch.tensor([0, 0, 0, 1]), "colour": torch.tensor([1, 1, 0, 1]), "pattern": torch.tensor([2, 3, 2, 2])}
    assert identity_accuracy(pred, t) == 0.25  # only the first image has all three right


def test_superclass_prompt_set_asks_for_what_the_prompt_says():
    from miniworld.quality import superclass_prompt_set

    prompts, wanted = superclass_prompt_set()
    assert len(prompts) == 25 * len(SHAPE_NAMES)
    w = dict(zip(prompts, wanted))
    assert w["a star in the snow"] == {"shape": SHAPE_NAMES.index("star"), "scene": SCENE_NAMES.index("snow")}
    assert w["a red star"]["colour"] == COLOUR_NAMES.index("red")
    assert "colour" not in w["a star on top of pink fabric"]  # the scene's colour, not the object's
    assert w["a cube shaped star"]["shape"] == SHAPE_NAMES.index("cube")
    assert w["a wet star"]["finish"] == FINISHES.index("wet")
