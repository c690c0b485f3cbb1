"""The one-command MiniWorld study, end to end on tiny settings: artifacts, one table row
per method × concept × sampler setting, Pareto plot, findings, and resume."""

from __future__ import annotations

import csv

import pytest

from miniworld.study import findings, front_height, load_config, run_study

TINY = {
    "base": "tiny", "clip": "tiny", "dino": "tiny", "seed": 0,
    "concepts": ["orange_checkered_ball", "green_dotted_cube"],
    "concept_data": {"resolution": 32, "batch_size": 2},
    "methods": {
        "dreambooth_qkv": {"class_path": "lightning_modules.DreamBoothQKV", "max_steps": 2},
        "textual_inversion": {"class_path": "lightning_modules.TextualInversion", "placeholder": "<c>", "max_steps": 2},
    },
    "evaluation": {"num_prompts": 2, "num_images": 1, "batch_size": 4, "defaults": {"num_steps": 3},
                   "save_grids": False, "device": "cpu"},
    "sweep": [
        {"sampler": "concept"}, {"sampler": "superclass"},
        {"sampler": "mixed", "zip": {"guidance_superclass": [0.0, 3.5], "guidance_concept": [7.0, 3.5]}},
        {"sampler": "switching", "grid": {"t_sw": [1]}},
        {"sampler": "profusion", "grid": {"r": [1.0]}},
    ],
}


def test_study_runs_and_resumes(tmp_path):
    out = tmp_path / "study"
    logs = []
    result = run_study(dict(TINY), out, log=logs.append)
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 6  # methods × concepts × sweep points
    assert {r["method"] for r in rows} == {"dreambooth_qkv", "textual_inversion"}
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "findings.md").exists()
    assert [f["claim"].split()[0] for f in result["findings"]] == ["concept", "the", "ProFusion"]
    for m in ("dreambooth_qkv", "textual_inversion"):
        for c in TINY["concepts"]:
            assert (out / "artifacts" / m / c / "personalize.json").exists()
    stamp = (out / "artifacts" / "textual_inversion" / "green_dotted_cube" / "personalize.json").stat().st_mtime_ns
    logs.clear()
    run_study(dict(TINY), out, log=logs.append)  # resume: nothing retrained, no cell recomputed
    assert (out / "artifacts" / "textual_inversion" / "green_dotted_cube" / "personalize.json").stat().st_mtime_ns == stamp
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_findings_logic():
    summary = [
        {"sampler": "concept", "setting": "", "settings": "{}", "clip_i": 0.9, "clip_t": 0.2, "unet_evals_per_image": 50},
        {"sampler": "superclass", "setting": "", "settings": "{}", "clip_i": 0.6, "clip_t": 0.3, "unet_evals_per_image": 50},
        {"sampler": "mixed", "setting": "a", "settings": '{"guidance_superclass": 3.5}', "clip_i": 0.8, "clip_t": 0.28,
         "unet_evals_per_image": 75},
        {"sampler": "switching", "setting": "b", "settings": "{}", "clip_i": 0.7, "clip_t": 0.25, "unet_evals_per_image": 50},
        {"sampler": "profusion", "setting": "c", "settings": "{}", "clip_i": 0.85, "clip_t": 0.26, "unet_evals_per_image": 125},
    ]
    assert [f["holds"] for f in findings(summary)] == [True, True, True]
    summary[3]["clip_i"] = 0.95  # switching above every mixed point at its CLIP-T
    assert findings(summary)[1]["holds"] is False
    assert front_height([(0.1, 0.5), (0.3, 0.7)], 0.2) == 0.7 and front_height([(0.1, 0.5)], 0.2) == float("-inf")


def test_unknown_method_is_a_clear_error(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("methods: {lora: {class_path: lightning_modules.LoRA, max_steps: 1}}\nconcepts: []\n")
    with pytest.raises(ValueError, match="Unknown method"):
        load_config(cfg, run_methods=["nope"])
