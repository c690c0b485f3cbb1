"""Data and trained weights are never lost or silently replaced: atomic artifacts, no
artifact from a run that trained nothing, torn last lines of append-only files dropped
and recomputed, output folders that hold no result are free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sample
from components.errors import UserError
from conftest import make, quiet_trainer
from evaluation.results import ResultStore
from lightning_modules import TextualInversion

SAMPLE = ["--model", "tiny", "--superclass", "dog", "--sampler", "concept", "--set", "num_steps=2", "--device", "cpu",
          "--prompts", "a {}", "--batch-size", "1"]


def test_a_crash_while_writing_an_artifact_leaves_the_previous_one(tmp_path, monkeypatch):
    module = make(TextualInversion, {"placeholder": "<x>"})
    folder = module.save_artifact(tmp_path / "artifact")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        module.token_embedding.new.add_(1.0)

    def crash(folder):
        (folder / "learned_embeds.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_artifact_files", crash)
    with pytest.raises(OSError, match="disk full"):
        module.save_artifact(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    module.save_artifact(folder)  # a whole write replaces it
    assert torch.equal(load_file(str(folder / "learned_embeds.safetensors"))["<x>"], module.token_embedding.new.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no temporary folder left


def test_a_run_that_trains_no_step_does_not_overwrite_the_artifact(tmp_path, demo_dm):
    from callbacks import ExportArtifact

    folder = make(TextualInversion, {"placeholder": "<x>"}).save_artifact(tmp_path / "artifact")
    before = (folder / "learned_embeds.safetensors").read_bytes()
    module = make(TextualInversion, {"placeholder": "<x>"}, learning_rate=1.0)
    with pytest.warns(UserWarning, match="No optimizer step was taken"):
        quiet_trainer(max_steps=0, callbacks=[ExportArtifact(str(folder))]).fit(module, demo_dm)
    assert (folder / "learned_embeds.safetensors").read_bytes() == before


def test_torn_manifest_line_is_dropped_and_its_image_made_again(tmp_path, capsys):
    out = tmp_path / "out"
    sample.main([*SAMPLE, "--num-images", "2", "--out", str(out)])
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    first = (out / "p000_i001.png").read_bytes()
    manifest.write_text(lines[0] + lines[1][:25])  # killed while appending the second record
    with pytest.warns(UserWarning, match="manifest.jsonl: dropped its unfinished last line"):
        sample.main([*SAMPLE, "--num-images", "2", "--out", str(out)])
    records = [json.loads(line) for line in manifest.read_text().splitlines()]  # every line parses again
    assert [r["file"] for r in records] == ["p000_i000.png", "p000_i001.png"]
    assert (out / "p000_i001.png").read_bytes() == first  # recomputed, the same image

    manifest.write_text(lines[0][:10] + "\n" + lines[1])  # damage in the middle: no guessing
    with pytest.raises(SystemExit):
        sample.main([*SAMPLE, "--num-images", "2", "--out", str(out)])
    assert "manifest.jsonl, line 1 is damaged" in capsys.readouterr().err


def test_a_folder_without_results_is_free_whatever_its_run_json_says(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "typo", "sampler": "mixed"}))  # a run that failed early
    sample.main([*SAMPLE, "--num-images", "1", "--out", str(out)])
    assert json.loads((out / "run.json").read_text())["sampler"] == "concept"
    with pytest.raises(SystemExit):  # now it holds an image: other settings are refused
        sample.main([*SAMPLE[:-6], "--set", "num_steps=3", *SAMPLE[-4:], "--num-images", "1", "--out", str(out)])


def test_torn_results_row_is_dropped_and_the_next_row_starts_a_new_line(tmp_path):
    store = ResultStore(tmp_path)
    row = {"subject": "dog", "sampler": "concept", "curve": "", "setting": "", "clip_i": 0.5, "clip_t": 0.25,
           "dino": 0.125, "unet_evals_per_image": 2, "max_unet_batch": 2, "num_images": 1, "seconds": 0.1,
           "settings": "{}"}
    store.append({**row, "key": "a"})
    store.append({**row, "key": "b"})
    part = tmp_path / "parts" / "rank0.csv"
    part.write_text(part.read_text()[:-20])  # killed while writing row b
    with pytest.warns(UserWarning, match="rank0.csv: dropped its unfinished last line"):
        assert sorted(store.done_keys()) == ["a"]
    store.append({**row, "key": "c"})  # would have glued onto the torn line
    assert sorted(r["key"] for r in store.rows()) == ["a", "c"]
    lines = part.read_text().splitlines()
    part.write_text("\n".join([lines[0], lines[1].replace("0.5", "x"), lines[2]]) + "\n")
    with pytest.raises(UserError, match=r"rank0.csv, line 2 is damaged"):
        store.rows()


def test_repeats_zero_is_refused():
    from datamodules.concept import ConceptDataError, ConceptDataModule

    with pytest.raises(ConceptDataError, match="data.repeats is 0"):
        ConceptDataModule(concept_dir="demo", resolution=32, repeats=0)
