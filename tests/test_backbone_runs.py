"""Validation and evaluation run unchanged on SD-XL and PixArt-α: the study's appendix J
setups (SVDiff on SD-XL, DreamBooth on PixArt-α) on the tiny presets are trained for two
steps with SamplerValidation in the fit, exported as artifacts, and sampled and scored by
sample.py's and evaluate.py's command lines (their main functions), as on SD."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build, quiet_trainer

pytest.importorskip("lightning_modules")
from callbacks.sampling import SamplerValidation  # noqa: E402
from datamodules.concept import ConceptDataModule  # noqa: E402
from lightning_modules import DreamBooth, SVDiff, load_personalized  # noqa: E402
from samplers import build_sampler  # noqa: E402

#: backbone -> (method, its arguments): the study's appendix J pairs, learning rates high
#: enough that two steps change the images
SETUPS = {
    "tiny-sdxl": (SVDiff, {"learning_rate": 0.5, "learning_rate_1d": 0.5}),
    "tiny-pixart": (DreamBooth, {"learning_rate": 1e-3}),
}
VALIDATION = [{"sampler": "concept", "num_steps": 2}, {"sampler": "masked", "num_steps": 2, "t_sw": 1}]


@pytest.fixture(scope="module", params=list(SETUPS))
def trained(request, tmp_path_factory):
    """(backbone, the trainer's log folder, the artifact folder) of a two-step fit with
    SamplerValidation at step 2."""
    from lightning.pytorch.loggers import CSVLogger

    backbone = request.param
    cls, kwargs = SETUPS[backbone]
    root = tmp_path_factory.mktemp(backbone)
    dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=1, validation_prompts="object")
    module = build(cls, pretrained_model=backbone, superclass=dm.superclass, **kwargs)
    cb = SamplerValidation(samplers=VALIDATION, every_n_steps=2, every_n_epochs=None, num_prompts=1, num_images=2,
                           batch_size=2, clip="tiny", dino="tiny")
    logger = CSVLogger(str(root), name="csv")
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, logger=logger, callbacks=[cb], default_root_dir=str(root))
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    return backbone, Path(logger.log_dir), module.save_artifact(root / "artifact")


def test_sampler_validation_scores_every_sampler_in_the_fit(trained):
    backbone, log_dir, _ = trained
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    for entry in VALIDATION:
        name = entry["sampler"]
        logged = [(int(r["step"]), {m: float(r[f"val/{name}/{m}"]) for m in ("clip_i", "clip_t", "dino")})
                  for r in rows if r.get(f"val/{name}/clip_i")]
        assert [s for s, _ in logged] == [2], (backbone, name)
        assert all(math.isfinite(v) for v in logged[0][1].values())
        assert len(list(log_dir.glob(f"images/val_{name}_grid_step000002.png"))) == 1


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_sample_py_writes_the_artifacts_images(trained, tmp_path):
    import sample

    backbone, _, artifact = trained
    args = ["--prompts", "a {} on the beach", "--sampler", "masked", "--set", "num_steps=2", "--set", "t_sw=1",
            "--num-images", "2", "--seed", "3", "--batch-size", "2", "--device", "cpu"]
    out = sample.main(["--artifact", str(artifact), "--out", str(tmp_path / "tuned")] + args)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["p000_i000.png", "p000_i001.png"]
    model = load_personalized(artifact=artifact)
    assert model.backbone.name == {"tiny-sdxl": "sdxl", "tiny-pixart": "pixart-alpha"}[backbone]
    expected = build_sampler("masked", num_steps=2, t_sw=1).sample_cells(
        model, [("a {} on the beach", 0), ("a {} on the beach", 1)], seed=3, batch_size=2).images
    for record, image in zip(records, expected):
        pixels = (image.permute(1, 2, 0) * 255).round().numpy().astype(int)
        assert np.abs(png(out / record["file"]) - pixels).max() <= 1
    # the base model (same backbone, same concept phrase) draws other images: the artifact is used
    base = sample.main(["--model", backbone, "--superclass", model.superclass, "--placeholder", model.placeholder,
                        "--out", str(tmp_path / "base")] + args)
    assert max(np.abs(png(out / r["file"]) - png(base / r["file"])).max() for r in records) > 2


def test_evaluate_py_scores_the_artifact(trained, tmp_path):
    import evaluate

    backbone, _, artifact = trained
    common = ["--concept-dir", "demo", "--sampler", "mixed", "--num-steps", "2", "--num-prompts", "1", "--num-images", "2",
              "--clip", "tiny", "--dino", "tiny", "--device", "cpu"]
    (tuned,) = evaluate.main(["--artifact", str(artifact), "--output", str(tmp_path / "tuned")] + common)
    assert tuned["sampler"] == "mixed" and (tmp_path / "tuned" / "results.csv").exists()
    assert all(math.isfinite(tuned[m]) for m in ("clip_i", "clip_t", "dino"))
    model = load_personalized(artifact=artifact)
    (base,) = evaluate.main(["--model", backbone, "--superclass", model.superclass, "--output", str(tmp_path / "base"),
                             "--no-grids"] + common)
    assert tuned["clip_i"] != pytest.approx(base["clip_i"], abs=1e-6)  # scored on the artifact's images
