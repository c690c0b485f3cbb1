"""The sampling command: images equal the sampler's, manifest, resume, and bad settings
rejected before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import sample
from components.loader import load_components
from components.personalized import BaseModel
from samplers import build_sampler

BASE = ["--model", "tiny", "--superclass", "dog", "--device", "cpu", "--seed", "3", "--batch-size", "3"]
PROMPTS = ["--prompts", "a {} on the beach", "a red {}"]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def expected_pixels(sampler, templates, indices, seed=3):
    model = BaseModel(load_components("tiny"), superclass="dog")
    out = sampler.sample_cells(model, [(t, i) for t in templates for i in indices], seed=seed, batch_size=3)
    return [(img.permute(1, 2, 0) * 255).round().numpy().astype(int) for img in out.images]


def test_writes_images_and_manifest_equal_to_the_sampler(tmp_path):
    out = sample.main(BASE + PROMPTS + ["--sampler", "mixed", "--set", "num_steps=3", "--set", "guidance_superclass=5",
                                        "--num-images", "2", "--out", str(tmp_path)])
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["p000_i000.png", "p000_i001.png", "p001_i000.png", "p001_i001.png"]
    r = records[2]
    assert r["template"] == "a red {}" and r["prompt"] == "a red sks dog" and r["superclass_prompt"] == "a red dog"
    assert r["index"] == 0 and r["seed"] == 3 and r["sampler"] == "mixed"
    assert r["settings"] == {"num_steps": 3, "guidance_concept": 3.5, "guidance_superclass": 5}
    assert r["cost"] == {"unet_evals_per_image": 9.0, "max_unet_batch": 3}
    sampler = build_sampler("mixed", num_steps=3, guidance_superclass=5)
    for record, pixels in zip(records, expected_pixels(sampler, ["a {} on the beach", "a red {}"], [0, 1])):
        assert np.abs(png(out / record["file"]) - pixels).max() <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["sampler"] == "mixed" and run["seed"] == 3 and run["settings"]["guidance_superclass"] == 5


def test_resume_skips_written_images_and_adds_new_ones(tmp_path, monkeypatch):
    args = BASE + ["--prompts", "a {} on the beach", "--sampler", "concept", "--set", "num_steps=2", "--out", str(tmp_path)]
    sample.main(args + ["--num-images", "2"])
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert sorted(before) == ["p000_i000.png", "p000_i001.png"]

    monkeypatch.setattr(sample, "load_model", lambda args: pytest.fail("nothing to do, yet the model was loaded"))
    sample.main(args + ["--num-images", "2"])  # everything is there: no work
    monkeypatch.undo()

    sample.main(args + ["--num-images", "3"])  # one more index
    after = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert sorted(after) == ["p000_i000.png", "p000_i001.png", "p000_i002.png"]
    assert all(after[name] == data for name, data in before.items())  # untouched
    records = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(records) == 3
    (pixels,) = expected_pixels(build_sampler("concept", num_steps=2), ["a {} on the beach"], [2])
    assert np.abs(png(tmp_path / "p000_i002.png") - pixels).max() <= 1


def test_out_dir_with_other_settings_is_an_error(tmp_path, capsys):
    args = BASE + ["--prompts", "a {} on the beach", "--num-images", "1", "--out", str(tmp_path)]
    sample.main(args + ["--sampler", "concept", "--set", "num_steps=2"])
    with pytest.raises(SystemExit) as err:
        sample.main(args + ["--sampler", "concept", "--set", "num_steps=2", "--set", "guidance=5"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "already holds images made with different settings" in message and "settings" in message
    with pytest.raises(SystemExit):  # another prompt under the same file name
        sample.main(BASE + ["--prompts", "a red {}", "--num-images", "1", "--out", str(tmp_path),
                            "--sampler", "concept", "--set", "num_steps=2"])
    assert "prompt 0 was 'a {} on the beach' there, now 'a red {}'" in capsys.readouterr().err
    assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "nonesuch"], "unknown sampler 'nonesuch'"),
    (["--sampler", "concept", "--set", "guidance=-2"], "concept: guidance=-2 is negative"),
    (["--sampler", "switching", "--set", "t_sw=60"], "switching: t_sw=60 is beyond num_steps=50"),
    (["--sampler", "masked", "--set", "q=1.5"], "masked: q=1.5 is outside (0, 1)"),
    (["--sampler", "photoswap", "--set", "num_steps=30", "--set", "t_sm=40"], "photoswap: t_sm=40 is beyond num_steps=30"),
    (["--sampler", "mixed", "--set", "guidance"], "--set 'guidance': write KEY=VALUE"),
    (["--sampler", "concept", "--prompts", "a dog"], "has no '{}' slot"),
    ([], "choose a sampler with --sampler NAME or --sampler_config YAML"),
])
def test_bad_settings_rejected_before_any_work(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sample, "load_model", lambda args: pytest.fail("the model was loaded before validation"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        sample.main(BASE + PROMPTS + ["--out", str(out)] + extra)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sampler_config_with_overrides(tmp_path, monkeypatch):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "samplers" / "masked.yaml"
    args = sample.parse_options(BASE + PROMPTS + ["--sampler-config", str(config), "--set", "q=0.5",
                                                  "--out", str(tmp_path)])
    sampler = sample.resolve_sampler(args)
    assert sampler.name == "masked" and sampler.q == 0.5 and sampler.t_sw == 3 and sampler.num_steps == 50
    args.sampler = "mixed"
    with pytest.raises(ValueError, match="contradicts"):
        sample.resolve_sampler(args)


def test_prompt_sources(tmp_path):
    parse = sample.parse_options
    live = sample.resolve_templates(parse(["--dreambooth-prompts", "live", "--out", "x"]))
    assert len(live) == 25 and live[0] == "a {} in the jungle" and "a {} in a chef outfit" in live
    obj = sample.resolve_templates(parse(["--dreambooth-prompts", "object", "--out", "x"]))
    assert len(obj) == 25 and "a {} floating in an ocean of milk" in obj
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na {} on the moon\n\na watercolor of a {}\n")
    assert sample.resolve_templates(parse(["--prompts", str(f), "--out", "x"])) == [
        "a {} on the moon", "a watercolor of a {}"]


def test_help_lists_samplers_and_settings(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = capsys.readouterr().out
    for name in ["concept", "superclass", "mixed", "switching", "multistage", "masked", "profusion", "photoswap"]:
        assert f"  {name} " in text
    assert "t_sf=5" in text and "q=0.7" in text
