"""HiFi Tuner's generation algorithms (issue 11): reference-guided generation (Algorithm 2)
as the ``reference_guided`` sampler, personalized subject replacement (Algorithm 3) and
``edit.py replace`` — with HiFi Tuner (step-wise) and DreamBooth artifacts on the
MiniWorld model, which are perturbed rather than trained (what a few steps would do)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.errors import UserError
from conftest import build
from editing.replace import caption_template, replace_subject
from lightning_modules import DreamBooth, HiFiTextualInversion, load_personalized
from samplers import SAMPLERS, build_sampler

MINIWORLD = "miniworld/pretrained/sd"
ROOT = Path(__file__).resolve().parents[1]


def perturbed(module, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g) * p.detach().std().clamp_min(0.02))
    return module.eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """HiFi Tuner (step-wise, 4 DDIM steps) and DreamBooth artifacts on the MiniWorld model, superclass star."""
    root = tmp_path_factory.mktemp("artifacts")
    hifi = build(HiFiTextualInversion, pretrained_model=MINIWORLD, superclass="star", num_tokens=3, num_ddim_steps=4,
                 steps_per_timestep=1, global_steps=1)
    hifi.phases_started.fill_(4)
    dreambooth = build(DreamBooth, pretrained_model=MINIWORLD, superclass="star")
    for p in dreambooth.unet.parameters():
        p.requires_grad_(False)
    dreambooth.unet.conv_out.requires_grad_(True)  # only a little changes, so the test model stays a MiniWorld model
    return {"hifi": perturbed(hifi).save_artifact(root / "hifi"),
            "dreambooth": perturbed(dreambooth, scale=0.05).save_artifact(root / "dreambooth")}


def settings(**kw):
    return dict(num_steps=6, t_s=4, t_e=2, inner_steps=2, references="miniworld:blue_striped_star", **kw)


def test_reference_guided_defaults_follow_the_paper():
    sampler = build_sampler("reference_guided")
    assert "reference_guided" in SAMPLERS
    s = sampler.settings()
    assert (s["num_steps"], s["t_s"], s["t_e"], s["inner_steps"], s["lr"]) == (50, 40, 10, 10, 1e-2)
    assert s["base"] == "concept" and s["base_settings"] == {"guidance": 7.5}
    with pytest.raises(ValueError, match="t_e <= t_s"):
        build_sampler("reference_guided", t_s=5, t_e=10)
    with pytest.raises(ValueError, match="own step"):
        build_sampler("reference_guided", base="photoswap")
    with pytest.raises(UserError, match="source images"):
        build_sampler("reference_guided").check_ready()


@pytest.mark.parametrize("kind", ["hifi", "dreambooth"])
def test_reference_guided_runs_on_artifacts_and_reports_its_cost(artifacts, kind):
    model = load_personalized(None, artifacts[kind])
    sampler = build_sampler("reference_guided", **settings())
    sampler.check_ready()
    templates = ["a {} on the beach"]
    out = sampler.sample(model, templates, num_images=1, seed=0)
    plain = build_sampler("concept", num_steps=6, guidance=7.5).sample(model, templates, num_images=1, seed=0)
    assert out.images.shape == plain.images.shape and out.images.isfinite().all()
    # both passes (2 rows a step, the second from t_s), J + 2 guided calls per guided step, the inversion, the segmenter
    n, i_s, i_e, j = 6, 2, 4, 2
    expected = 2 * n + 2 * (n - i_s) + (i_e - i_s + 1) * 2 * (j + 1) + n + 3
    assert out.cost["unet_evals_per_image"] == expected
    assert out.cost["optimizer_steps_per_image"] == (i_e - i_s + 1) * j
    assert (out.images - plain.images).abs().max() > 1e-3  # the reference changed the subject region


def test_reference_guided_with_an_empty_subject_mask_is_the_base_sampler(artifacts):
    """With empty masks (M_g and M_r) nothing is substituted and eq. 10 has nothing to
    match: the two passes give the base sampler's image, whatever J and t_s, t_e."""
    model = load_personalized(None, artifacts["hifi"])
    sampler = build_sampler("reference_guided", **settings())
    refs = sampler.load_references(model)
    refs["masks"] = [torch.zeros(1, 32, 32, dtype=torch.bool) for _ in refs["masks"]]
    sampler._cache[("segmenter", id(model))] = lambda images, word, prompts=None: torch.zeros(
        images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
    out = sampler.sample(model, ["a {} in the snow"], num_images=1, seed=3)
    plain = build_sampler("concept", num_steps=6, guidance=7.5).sample(model, ["a {} in the snow"], num_images=1, seed=3)
    torch.testing.assert_close(out.images, plain.images, atol=1e-5, rtol=0)


def world_ball():
    from miniworld.world import World

    world = World(1)
    s = next(world.sample(i) for i in range(200) if world.sample(i).obj.shape == "star" and "star" in world.sample(i).caption.split())
    return torch.from_numpy(s.image).permute(2, 0, 1).float() / 255, s.caption


def test_caption_template_needs_the_word():
    assert caption_template("a red ball on the beach", "ball") == "a red {} on the beach"
    assert caption_template("a Ball, on a ball", "ball") == "a {}, on a ball"
    with pytest.raises(UserError, match="not in the caption"):
        caption_template("a red ball on the beach", "cube")
    with pytest.raises(UserError, match="not in the caption"):
        caption_template("a red balloon", "ball")


@pytest.mark.parametrize("kind", ["hifi", "dreambooth"])
def test_subject_replacement_frees_the_concept_and_the_word(artifacts, kind):
    model = load_personalized(None, artifacts[kind])
    image, caption = world_ball()
    result = replace_subject(model, image, caption, "star", num_steps=4, inner_steps=2, lr=5e-2)
    assert result.image.shape == image.shape and result.image.isfinite().all()
    tokens = model.prompt_tokens(result.edit_prompt)
    star = model.components.tokenizer("star", add_special_tokens=False).input_ids[0]
    concept = model.concept_token_positions(caption_template(caption, "star"))
    assert set(concept) <= set(result.free_rows) and tokens.index(star) in result.free_rows
    if kind == "hifi":  # the edit text is the caption's; c_s^t in the last rows
        assert concept == list(range(len(tokens) - 3, len(tokens)))
    else:
        assert len(result.free_rows) == 2  # "sks" and "star"
    assert result.cost["optimizer_steps_per_image"] <= 4 * 2 and result.cost["stored_attention_bytes"] > 0
    assert (result.image - result.reconstruction).abs().max() > 1e-3


def test_replacing_a_word_by_itself_reproduces_the_null_text_reconstruction():
    """With the concept phrase equal to the word the edit prompt is the caption: replaying the
    stored maps (fp32) reproduces the reconstruction (a check of store, replay and plan)."""
    from components.loader import load_components
    from components.personalized import BaseModel

    model = BaseModel(load_components(MINIWORLD), superclass="star", placeholder="")
    image, caption = world_ball()
    result = replace_subject(model, image, caption, "star", num_steps=4, inner_steps=2, lr=5e-2, store_dtype=torch.float32)
    assert result.edit_prompt == " ".join(caption.split())
    torch.testing.assert_close(result.image, result.reconstruction, atol=2e-3, rtol=0)


def run_edit(capsys, *argv):
    """edit.py in this process: (exit status, stdout, stderr)."""
    import edit
    from components.errors import run_command

    try:
        run_command(edit.main, list(argv), prog="edit.py")
        code = 0
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_edit_cli_refuses_bad_input_before_loading(tmp_path, artifacts, capsys, monkeypatch):
    import lightning_modules
    from PIL import Image

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(lightning_modules, "load_personalized", no_loading)
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not an image")
    empty = tmp_path / "empty_artifact"
    empty.mkdir()
    no_phrase = tmp_path / "no_phrase"
    no_phrase.mkdir()
    manifest = json.loads((Path(artifacts["dreambooth"]) / "personalize.json").read_text())
    (no_phrase / "personalize.json").write_text(json.dumps({**manifest, "placeholder": "", "concept_phrase": ""}))
    out = ["--out", str(tmp_path / "o.png")]
    good = ["--caption", "a red star on the beach", "--word", "star"]
    cases = [
        (["--image", str(image), "--artifact", str(artifacts["hifi"]), "--caption", "a red star", "--word", "ball"],
         "not in the caption"),
        (["--image", str(bad_image), "--artifact", str(artifacts["hifi"]), *good], "not a readable image"),
        (["--image", str(tmp_path / "missing.png"), "--artifact", str(artifacts["hifi"]), *good], "does not exist"),
        (["--image", str(image), "--artifact", str(empty), *good], "personalize.json is missing"),
        (["--image", str(image), "--artifact", str(no_phrase), *good], "no concept phrase"),
    ]
    for argv, message in cases:
        code, stdout, stderr = run_edit(capsys, "replace", *argv, *out)
        assert code == 2, (argv, stderr)
        assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o.png").exists()


def test_edit_cli_replaces(tmp_path, artifacts, capsys):
    from PIL import Image

    image, caption = world_ball()
    path = tmp_path / "in.png"
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    out = tmp_path / "out.png"
    code, stdout, stderr = run_edit(capsys, "replace", "--image", str(path), "--caption", caption, "--word", "star",
                                    "--artifact", str(artifacts["hifi"]), "--out", str(out), "--num-steps", "3",
                                    "--inner-steps", "1", "--device", "cpu", "--save-reconstruction")
    assert code == 0, stderr
    assert out.exists() and Image.open(out).size == (32, 32) and (tmp_path / "out_reconstruction.png").exists()
    assert "null-text" in stderr and "edit" in stderr  # progress bars
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["cost"]["unet_evals_per_image"] == 3 + 3 * (1 + 1 + 1) + 3 * 2  # invert, null-text, edit


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-pixart"])
def test_other_backbones_get_a_clear_error(preset):
    from components.loader import load_components
    from components.personalized import BaseModel

    model = BaseModel(load_components(preset), superclass="star")
    with pytest.raises(UserError, match="built for Stable Diffusion 1.x/2.x"):
        build_sampler("reference_guided", **settings()).sample(model, ["a {}"], num_images=1)
    with pytest.raises(UserError, match="built for Stable Diffusion 1.x/2.x"):
        replace_subject(model, torch.rand(3, 32, 32), "a star on the beach", "star", num_steps=2)


def test_evaluate_runs_reference_guided_next_to_shared_settings(tmp_path):
    """evaluate.py's sweep (sharing on): reference_guided runs on its own with the subject's
    images as references; the planner still shares the other settings."""
    import csv

    import numpy as np
    from PIL import Image

    from evaluation import EvalConfig, run_evaluation

    root = tmp_path / "db"
    (root / "dog").mkdir(parents=True)
    for i in range(2):
        img = np.full((32, 32, 3), (200, 120, 40), np.uint8)
        img[8:24, 8:24] = (40, 90, 200)
        Image.fromarray(img).save(root / "dog" / f"{i:02d}.png")
    (root / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog,dog\n")
    sweep = [{"sampler": "concept"},
             {"sampler": "reference_guided", "settings": {"t_s": 2, "t_e": 1, "inner_steps": 1, "caption": "a {}",
                                                          "dino": "tiny"}}]
    cfg = EvalConfig(model="tiny", dreambooth_root=str(root), subjects=["dog"], num_prompts=2, num_images=1, batch_size=4,
                     defaults={"num_steps": 2}, sweep=sweep, clip="tiny", dino="tiny", output=str(tmp_path / "out"),
                     device="cpu")
    run_evaluation(cfg, log=lambda *_: None)
    table = {r["sampler"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert set(table) == {"concept", "reference_guided"}
    assert float(table["concept"]["unet_evals_per_image"]) == 2 * 2
    # first pass 2·2, two guided steps of 2 + 2·J + 2, the inversion 2, the segmenter 3 on I_g1; the references
    # have no masks: 3 more rows per reference picked (1 or 2 of them, over the 2 images)
    assert float(table["reference_guided"]["unet_evals_per_image"]) in (4 + 2 * 6 + 2 + 3 + 1.5, 4 + 2 * 6 + 2 + 3 + 3)
    assert float(table["reference_guided"]["num_images"]) == 2


def test_sample_cli_runs_reference_guided_and_refuses_it_without_references(tmp_path, artifacts, monkeypatch, capsys):
    import sample

    base = ["--artifact", str(artifacts["hifi"]), "--device", "cpu", "--prompts", "a {} on the beach", "--num-images", "1",
            "--sampler", "reference_guided", "--set", "num_steps=4", "--set", "t_s=2", "--set", "t_e=1",
            "--set", "inner_steps=1"]
    out = sample.main(base + ["--set", "references=miniworld:blue_striped_star", "--out", str(tmp_path / "ok")])
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["sampler"] == "reference_guided" and record["cost"]["optimizer_steps_per_image"] == 2
    assert (out / "p000_i000.png").exists()
    monkeypatch.setattr(sample, "load_model", lambda args: pytest.fail("the model was loaded before validation"))
    for extra, message in ((["--out", str(tmp_path / "no")], "needs the concept's source images"),
                           (["--set", f"references={tmp_path}/missing", "--out", str(tmp_path / "no")], "does not exist")):
        with pytest.raises(SystemExit) as err:
            sample.main(base + extra)
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_reference_captions_sources(tmp_path):
    from samplers.reference_guided import reference_captions

    paths = [tmp_path / "00.png", tmp_path / "01.png"]
    assert reference_captions(tmp_path, paths, "dog", caption="a {} on a sofa") == ["a dog on a sofa"] * 2
    (tmp_path / "captions.txt").write_text("00.png: a dog on grass\n01: a dog in snow\n")
    assert reference_captions(tmp_path, paths, "dog") == ["a dog on grass", "a dog in snow"]
    (tmp_path / "captions.txt").unlink()
    with pytest.raises(UserError, match="no captions"):
        reference_captions(tmp_path, paths, "dog")
    with pytest.raises(UserError, match="BLIP-2 weights"):  # the optional captioner, weights missing
        reference_captions(tmp_path, paths, "dog", captioner=str(tmp_path / "no-blip2"), images=torch.rand(2, 3, 32, 32))
    json_folder = tmp_path / "world"
    json_folder.mkdir()
    (json_folder / "concept.json").write_text(json.dumps({"scenes": ["beach", "snow"]}))
    assert reference_captions(json_folder, paths, "star") == ["a star on the beach", "a star in the snow"]


def test_sampler_validation_runs_reference_guided_on_the_training_concept(tmp_path):
    """SamplerValidation hands the DataModule's concept folder to reference_guided."""
    import lightning as L

    from callbacks.sampling import SamplerValidation
    from datamodules.concept import ConceptDataModule

    L.seed_everything(0)
    dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=2, repeats=2, validation_prompts="object")
    model = DreamBooth(pretrained_model="tiny", superclass=dm.superclass, learning_rate=1e-4)
    cb = SamplerValidation(samplers=[{"sampler": "reference_guided", "num_steps": 2, "t_s": 2, "t_e": 1, "inner_steps": 1,
                                      "caption": "a {}", "dino": "tiny"}],
                           clip="tiny", dino="tiny", num_prompts=1, num_images=1, every_n_epochs=None, every_n_steps=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    assert {"val/reference_guided/clip_i", "val/reference_guided/dino"} <= set(cb.last_values)
    assert cb.entries[0].sampler.reference_folder() == __import__("pathlib").Path(dm.concept_dir)


def test_hifi_generation_loads_through_load_model(tmp_path, artifacts, monkeypatch):
    """Both commands check the artifact before loading and load it as the other commands do
    (lightning_modules.loading.load_model, on the CPU), not through load_personalized."""
    import lightning_modules
    import lightning_modules.loading as loading
    from miniworld import hifi_generation

    class Loaded(Exception):
        pass

    calls = []

    def fake_load_model(model, artifact=None, **kw):
        calls.append((model, artifact, kw))
        raise Loaded

    monkeypatch.setattr(loading, "load_model", fake_load_model)
    monkeypatch.setattr(lightning_modules, "load_personalized", lambda *a, **k: pytest.fail("load_personalized called"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in (hifi_generation.Reference, hifi_generation.Replace):
        run = hifi_generation.reference if command is hifi_generation.Reference else hifi_generation.replace
        with pytest.raises(Loaded):
            run(command(artifact=str(artifacts["dreambooth"]), concept="blue_striped_star", out=str(tmp_path)))
        with pytest.raises(UserError, match="personalize.json is missing"):
            run(command(artifact=str(empty), concept="blue_striped_star", out=str(tmp_path)))
    assert calls == [(None, str(artifacts["dreambooth"]), {"device": "cpu"})] * 2
