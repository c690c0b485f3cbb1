"""Evaluation runs: sweep expansion, Pareto front, the results table, resuming, sharding."""

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build
from evaluation import EvalConfig, Ranks, ResultStore, expand_sweep, pareto_mask, run_evaluation, summarize

SWEEP = [{"sampler": "mixed", "zip": {"guidance_superclass": [0.0, 7.0], "guidance_concept": [7.0, 0.0]}}]


def _dreambooth_root(tmp_path: Path) -> Path:
    """A DreamBooth-layout root with two tiny subjects (a live one and an object)."""
    root = tmp_path / "db"
    rng = np.random.default_rng(0)
    for name, color in (("dog", (200, 120, 40)), ("teapot", (40, 90, 200))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            img = np.clip(np.array(color) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    (root / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog,dog\nteapot,teapot\n")
    return root


def _cfg(tmp_path, **kw) -> EvalConfig:
    root = tmp_path / "db" if (tmp_path / "db").exists() else _dreambooth_root(tmp_path)
    base = dict(model="tiny", dreambooth_root=str(root), subjects=["dog"], num_prompts=2, num_images=1, batch_size=4,
                defaults={"num_steps": 2}, sweep=SWEEP, clip="tiny", dino="tiny", output=str(tmp_path / "out"), device="cpu")
    return EvalConfig(**{**base, **kw})


def test_sweep_expansion_grid_zip_list_and_validation():
    points = expand_sweep([
        {"sampler": "mixed", "zip": {"guidance_superclass": [0, 3.5, 7], "guidance_concept": [7, 3.5, 0]}},
        {"sampler": "switching", "settings": {"guidance": 7}, "grid": {"t_sw": [3, 7]}},
        {"sampler": "photoswap", "list": [{"t_sf": 5, "t_cm": 15, "t_sm": 20}]},
        {"sampler": "switching", "grid": {"t_sw": [7]}, "settings": {"guidance": 7}},  # a duplicate point
    ], defaults={"num_steps": 20})
    assert [(p.sampler, p.label) for p in points] == [
        ("mixed", "guidance_superclass=0,guidance_concept=7"), ("mixed", "guidance_superclass=3.5,guidance_concept=3.5"),
        ("mixed", "guidance_superclass=7,guidance_concept=0"), ("switching", "t_sw=3"), ("switching", "t_sw=7"),
        ("photoswap", "t_sf=5,t_cm=15,t_sm=20"),
    ]
    assert points[0].settings == {"num_steps": 20, "guidance_concept": 7.0, "guidance_superclass": 0.0}
    assert points[0].build().settings() == points[0].settings
    with pytest.raises(ValueError, match="t_sw"):  # t_sw beyond num_steps: refused before any sampling
        expand_sweep([{"sampler": "switching", "grid": {"t_sw": [3, 40]}}], defaults={"num_steps": 20})
    with pytest.raises(ValueError, match="equal lengths"):
        expand_sweep([{"sampler": "mixed", "zip": {"guidance_superclass": [0, 1], "guidance_concept": [7]}}])
    with pytest.raises(ValueError, match="unknown key"):
        expand_sweep([{"sampler": "mixed", "grids": {}}])


def test_pareto_front_is_the_upper_right_envelope():
    xs = [0.20, 0.25, 0.30, 0.22, 0.30]
    ys = [0.80, 0.75, 0.60, 0.70, 0.55]
    assert pareto_mask(xs, ys) == [True, True, True, False, False]
    rows = [dict(curve="c", sampler="s", setting=str(i), settings=str(i), clip_i=y, clip_t=x, dino=y,
                 unet_evals_per_image=2.0, max_unet_batch=2.0, num_images=1.0, seconds=0.0) for i, (x, y) in enumerate(zip(xs, ys))]
    assert [r["pareto"] for r in summarize(rows)] == [True, True, True, False, False]


def test_two_setting_sweep_writes_table_and_plot_and_rerun_skips(tmp_path):
    cfg = _cfg(tmp_path)
    logs = []
    rows = run_evaluation(cfg, log=logs.append)
    assert len(rows) == 2 and logs[0].endswith("2 cells, 0 done, 2 to run on 1 rank(s)")
    table = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["setting"] for r in table] == ["guidance_superclass=0,guidance_concept=7", "guidance_superclass=7,guidance_concept=0"]
    for r in table:
        assert r["subject"] == "dog" and r["sampler"] == "mixed"
        for m in ("clip_i", "clip_t", "dino"):
            assert -1.0 <= float(r[m]) <= 1.0
        assert float(r["unet_evals_per_image"]) == 3 * 2  # 3 branches (u, c, s) × 2 steps
        assert float(r["num_images"]) == 2  # 2 prompts × 1 image
    assert table[0]["clip_t"] != table[1]["clip_t"]  # the two settings gave different images
    plot = np.asarray(Image.open(tmp_path / "out" / "pareto.png").convert("L"))
    assert plot.shape[0] > 300 and plot.std() > 10  # a drawn figure, not an empty canvas
    assert (tmp_path / "out" / "summary.csv").exists() and (tmp_path / "out" / "pareto_dino.png").exists()
    grids = sorted((tmp_path / "out" / "grids" / "dog").glob("*.png"))
    assert len(grids) == 2 and Image.open(grids[0]).size == (2 + 34, 2 + 2 * 34)  # 2 prompt rows × 1 image

    # a rerun skips every finished cell; a new setting runs alone
    logs.clear()
    again = run_evaluation(cfg, log=logs.append)
    assert logs == ["[eval] 2 cells, 2 done, 0 to run on 1 rank(s)"]
    assert [r["clip_i"] for r in again] == [float(r["clip_i"]) for r in table]
    cfg3 = _cfg(tmp_path, sweep=SWEEP + [{"sampler": "concept"}])
    logs.clear()
    rows3 = run_evaluation(cfg3, log=logs.append)
    assert logs[0].endswith("3 cells, 2 done, 1 to run on 1 rank(s)") and len(rows3) == 3
    # a changed protocol is refused instead of mixing incomparable rows
    with pytest.raises(ValueError, match="another evaluation"):
        run_evaluation(_cfg(tmp_path, num_images=2), log=logs.append)


def test_cells_sharded_over_two_ranks_equal_one_rank(tmp_path, monkeypatch):
    """Two concurrent ranks (threads with a real barrier) share the cells and rank 0 merges them."""
    import evaluation.run as run_mod

    # Model loading (transformers / diffusers meta-device init) is not thread-safe; ranks are
    # processes in real runs, threads here, so loads take turns.
    lock = threading.Lock()
    get, metrics_cls = run_mod.ModelSource.get, run_mod.ConceptMetrics

    def locked_get(self, subject):
        with lock:
            return get(self, subject)

    def locked_metrics(*args, **kwargs):
        with lock:
            return metrics_cls(*args, **kwargs)

    monkeypatch.setattr(run_mod.ModelSource, "get", locked_get)
    monkeypatch.setattr(run_mod, "ConceptMetrics", locked_metrics)
    kw = dict(subjects=["dog", "teapot"])
    single = run_evaluation(_cfg(tmp_path, output=str(tmp_path / "single"), **kw), log=lambda m: None)

    barrier = threading.Barrier(2)
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = run_evaluation(_cfg(tmp_path, output=str(tmp_path / "ddp"), **kw),
                                        Ranks(r, 2, torch.device("cpu"), barrier.wait), log=lambda m: None)
        except Exception as err:  # noqa: BLE001
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # with shared sampling (the default) a rank takes whole subjects: rank 1 has teapot
    assert [(r["subject"], r["setting"]) for r in results[1]] == [("teapot", single[2]["setting"]), ("teapot", single[3]["setting"])]
    merged = results[0]
    assert [r["key"] for r in merged] == [r["key"] for r in single]  # all 4 cells, in plan order
    for a, b in zip(merged, single):
        for m in ("clip_i", "clip_t", "dino"):
            assert float(a[m]) == pytest.approx(float(b[m]), abs=1e-5)
    assert not (tmp_path / "ddp" / "parts").exists()  # part files merged away
    assert len(ResultStore(tmp_path / "ddp").rows()) == 4


def test_finish_logs_table_and_pareto_plot_to_wandb(tmp_path, monkeypatch):
    import json

    import wandb

    from evaluation import finish

    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [dict(subject=s, sampler="mixed", curve="mixed", setting=f"guidance_superclass={w}", clip_i=0.9 - 0.02 * w + d,
                 clip_t=0.2 + 0.01 * w + d, dino=0.5, unet_evals_per_image=150.0, max_unet_batch=3.0, num_images=25.0,
                 seconds=1.0, settings=json.dumps({"w": w}), key=f"{s}|mixed|{w}")
            for s, d in (("dog", 0.0), ("cat", 0.01)) for w in (0, 3.5, 7)]
    run = wandb.init(project="personalize-test", dir=str(tmp_path))
    summary = finish(rows, tmp_path)
    run.finish()
    assert [r["subjects"] for r in summary] == [2, 2, 2]
    assert summary[1]["clip_i"] == pytest.approx(0.9 - 0.07 + 0.005)  # mean over the two subjects
    media = Path(glob_one(tmp_path / "wandb", "offline-run-*")) / "files" / "media"
    table = json.loads(Path(glob_one(media / "table" / "eval", "results_*.table.json")).read_text())
    assert len(table["data"]) == 6 and table["columns"][:7] == ["subject", "sampler", "curve", "setting", "clip_i", "clip_t", "dino"]
    assert "unet_evals_per_image" in table["columns"]
    png = np.asarray(Image.open(glob_one(media / "images" / "eval", "pareto_clip_i_*.png")).convert("L"))
    assert png.std() > 10


def glob_one(folder: Path, pattern: str) -> str:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (folder, pattern, found)
    return str(found[0])


def test_cli_builds_the_config(tmp_path):
    from evaluate import build_config, parse_args

    cfg = build_config(parse_args([
        "--config", str(Path(__file__).resolve().parents[1] / "configs" / "eval" / "quickstart.yaml"),
        "--model", "tiny", "--sampler", "mixed", "--set", "guidance_concept=2", "--set", "guidance_superclass=5",
        "--num-steps", "10", "--no-dino", "--output", str(tmp_path / "o"),
    ]))
    assert cfg.model == "tiny" and cfg.concept_dir == "demo" and cfg.dino is None
    assert cfg.sweep == [{"sampler": "mixed", "settings": {"guidance_concept": 2, "guidance_superclass": 5}}]
    assert expand_sweep(cfg.sweep, cfg.defaults)[0].settings["num_steps"] == 10


def test_trained_artifact_per_subject_is_evaluated(tmp_path):
    """--artifact 'runs/{subject}/artifact': each subject's artifact is loaded and sampled."""
    pytest.importorskip("lightning_modules")
    from lightning_modules import DreamBooth

    module = build(DreamBooth, pretrained_model="tiny", superclass="dog")
    with torch.no_grad():
        module.unet.conv_out.weight.mul_(3.0)  # a "trained" UNet that differs from the base
    module.save_artifact(tmp_path / "runs" / "dog" / "artifact")
    kw = dict(sweep=[{"sampler": "concept"}], save_grids=False)
    tuned = run_evaluation(_cfg(tmp_path, model=None, artifact=str(tmp_path / "runs" / "{subject}" / "artifact"),
                                output=str(tmp_path / "tuned"), **kw), log=lambda m: None)
    base = run_evaluation(_cfg(tmp_path, output=str(tmp_path / "base"), **kw), log=lambda m: None)
    assert len(tuned) == 1 and tuned[0]["subject"] == "dog"
    assert tuned[0]["clip_i"] != pytest.approx(base[0]["clip_i"], abs=1e-6)
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        run_evaluation(_cfg(tmp_path, model=None, output=str(tmp_path / "none"), **kw), log=lambda m: None)


def test_shared_sweep_scores_equal_the_unshared_sweep(tmp_path):
    """share (the default: the subject's settings planned together) and share=False give
    the same table, with the per-setting cost columns unchanged."""
    kw = dict(sweep=SWEEP + [{"sampler": "switching", "grid": {"t_sw": [1]}}], save_grids=False)
    shared = run_evaluation(_cfg(tmp_path, output=str(tmp_path / "shared"), **kw), log=lambda m: None)
    alone = run_evaluation(_cfg(tmp_path, output=str(tmp_path / "alone"), share=False, **kw), log=lambda m: None)
    assert [r["key"] for r in shared] == [r["key"] for r in alone]
    for a, b in zip(shared, alone):
        assert float(a["unet_evals_per_image"]) == float(b["unet_evals_per_image"])
        for m in ("clip_i", "clip_t", "dino"):
            assert float(a[m]) == pytest.approx(float(b[m]), abs=1e-5)


def test_folder_subject_takes_the_training_concept_sources(tmp_path):
    """evaluate.py's --concept-dir reads the sources training's --data.concept_dir reads:
    'miniworld:<concept>' gives the world's views, superclass and its own prompt set; a
    missing folder is one user error naming the fix."""
    from components.errors import MissingFileError
    from evaluation.subjects import folder_subject
    from miniworld.concepts import PROMPTS

    subject = folder_subject("miniworld:orange_checkered_ball", "")
    assert subject.superclass == "ball" and subject.name == "orange_checkered_ball"
    assert subject.templates == list(PROMPTS)
    assert len([p for p in subject.images.glob("*.png") if not p.stem.endswith("_mask")]) == 5
    with pytest.raises(MissingFileError, match="miniworld:<concept>"):
        folder_subject(tmp_path / "nothing_here", "dog")
