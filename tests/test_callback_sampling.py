"""SamplerValidation: logged keys and grids (W&B offline, CSV, TensorBoard), sharded work,
and training that continues exactly as without the callback, even when validation fails."""

import glob
import hashlib
import json
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.sampling import SamplerValidation, preserved_state
from wandb_offline import history

pytest.importorskip("lightning_modules")
from datamodules.concept import ConceptDataModule  # noqa: E402
from lightning_modules import DreamBooth  # noqa: E402

TINY = dict(clip="tiny", dino="tiny", num_prompts=2, num_images=2, every_n_epochs=None)
SAMPLERS = [{"sampler": "concept", "num_steps": 2}, {"sampler": "mixed", "num_steps": 2}]


class Recorder(L.Callback):
    """After each step (and after any validation of that step): loss, RNG states, modes, dtypes."""

    def __init__(self):
        self.losses, self.states = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes() + repr(random.getstate()).encode()
                             + np.random.get_state()[1].tobytes()).hexdigest()
        modes = tuple(m.training for m in pl_module.modules())
        dtypes = tuple(str(p.dtype) for p in pl_module.parameters())
        self.states.append((rng, modes, dtypes))


def _fit(root, callbacks, logger=False, steps=4):
    L.seed_everything(0)
    dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=2, repeats=2, validation_prompts="object")
    model = DreamBooth(pretrained_model="tiny", superclass=dm.superclass, learning_rate=1e-4)
    rec = Recorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, callbacks=[*callbacks, rec],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(model, dm)
    return rec, trainer


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same training without the callback."""
    rec, _ = _fit(tmp_path_factory.mktemp("plain"), [])
    return rec


def _wandb_history(run_dir: Path, wait_for: str, timeout: float = 60.0) -> list[dict]:
    """History rows of an offline run, read from its .wandb file (a LevelDB-style record log).

    wandb-core may still be writing the file after ``wandb.finish()`` returns (seen on a loaded
    machine), so this re-reads it until a row holds ``wait_for`` or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = history(run_dir)
        if any(wait_for in r for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def test_wandb_keys_grids_and_identical_training(tmp_path, reference_run, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    cb = SamplerValidation(samplers=SAMPLERS, every_n_steps=3, **TINY)  # at step 3 of 4: training goes on after it
    logger = WandbLogger(project="personalize-test", save_dir=str(tmp_path), offline=True)
    rec, trainer = _fit(tmp_path, [cb], logger)
    wandb.finish()

    # training went on exactly as without the callback
    assert rec.losses == reference_run.losses
    assert rec.states == reference_run.states

    run_dir = Path(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0])
    logged = [r for r in _wandb_history(run_dir, "val/mixed/clip_i") if "val/mixed/clip_i" in r]
    assert [r["trainer/global_step"] for r in logged] == [3]
    expected = {f"val/{s}/{m}" for s in ("concept", "mixed") for m in ("clip_i", "clip_t", "dino")}
    assert expected <= set(logged[-1])
    for k in expected:
        assert logged[-1][k] == pytest.approx(cb.last_values[k], abs=1e-6)
        assert -1.0 <= logged[-1][k] <= 1.0
    assert logged[-1]["val/concept/clip_i"] != logged[-1]["val/mixed/clip_i"]  # each sampler scored on its own images

    for sampler in ("concept", "mixed"):
        grids = sorted(glob.glob(str(run_dir / "files" / "media" / "images" / "val" / sampler / "grid_*.png")))
        assert len(grids) == 1
        grid = np.asarray(Image.open(grids[0]).convert("RGB"))
        assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # rows prompts, columns seeds, 32 px + padding
        cell = grid[2:34, 2:34].astype(float)
        assert cell.std() > 5 and cell.mean() > 5  # a real image, not a black or flat one


class _Messy:
    """Wraps a sampler: disturbs RNGs, modes and dtypes like a careless sampler would; raises on call 1."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def sample_cells(self, model, cells, seed=0, batch_size=8, progress=False):
        self.calls += 1
        torch.rand(100), random.random(), np.random.rand(3)
        model.train()
        if self.calls == 1:
            raise RuntimeError("sampler exploded")
        out = self.inner.sample_cells(model, cells, seed=seed, batch_size=batch_size)
        model.unet.to(torch.float64)  # a lossless cast, so restoring it is exact
        return out


def test_csv_tensorboard_and_failure_keep_training_identical(tmp_path, reference_run):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    cb = SamplerValidation(samplers=SAMPLERS, every_n_steps=2, **TINY)
    cb.entries[0].sampler = _Messy(cb.entries[0].sampler)  # concept fails at step 2; mixed works
    loggers = [CSVLogger(str(tmp_path), name="csv"), TensorBoardLogger(str(tmp_path), name="tb")]
    with pytest.warns(UserWarning, match="sampler exploded"):
        rec, trainer = _fit(tmp_path, [cb], loggers)
    assert cb.entries[0].sampler.calls == 2  # steps 2 (failed) and 4: the run went on
    assert rec.losses == reference_run.losses
    assert rec.states == reference_run.states  # RNGs, per-module modes and dtypes restored

    import csv

    rows = list(csv.DictReader(open(Path(loggers[0].log_dir) / "metrics.csv")))
    logged = [(int(r["step"]), float(r["val/concept/clip_t"])) for r in rows if r.get("val/concept/clip_t")]
    assert [s for s, _ in logged] == [4]  # nothing logged for the failed round
    # the sampler that worked is logged at both rounds: each sampler's validation is isolated
    assert [int(r["step"]) for r in rows if r.get("val/mixed/clip_t")] == [2, 4]
    pngs = sorted(Path(trainer.log_dir).glob("images/val_concept_grid_step*.png"))
    assert [p.name for p in pngs] == ["val_concept_grid_step000004.png"]
    assert len(list(Path(trainer.log_dir).glob("images/val_mixed_grid_step*.png"))) == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(loggers[1].log_dir)
    acc.Reload()
    assert "val/concept/grid" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("val/concept/clip_i")] == [4]


def test_settings_are_validated_before_training():
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerValidation(samplers=["nope"], clip="tiny")
    with pytest.raises(ValueError, match="t_sw"):
        SamplerValidation(samplers=[{"sampler": "switching", "num_steps": 10, "t_sw": 40}], clip="tiny")
    with pytest.raises(ValueError, match="slot"):
        SamplerValidation(prompts=["a dog"], clip="tiny")
    with pytest.raises(ValueError, match="backbone"):
        SamplerValidation(clip=None, dino=None)
    names = [e.name for e in SamplerValidation(samplers=["mixed", {"sampler": "mixed", "name": "mixed_w5"}, "mixed"]).entries]
    assert names == ["mixed", "mixed_w5", "mixed_2"]


def test_preserved_state_restores_module_and_rng():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    m[1].eval()
    before = torch.get_rng_state()
    with preserved_state(m):
        m.train()
        m.double()
        torch.rand(10)
        torch.set_grad_enabled(False)
    assert m[0].training and not m[1].training
    assert m[0].weight.dtype == torch.float32 and torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), before)


class _DumpOnEnd(L.Callback):
    """Each rank writes what the validation callback logged; rank 0 also scores all cells
    alone, with the sampler the callback scored (with ``choose``: the chosen one)."""

    def __init__(self, cb, out_dir):
        self.cb, self.out_dir = cb, out_dir

    def on_train_end(self, trainer, pl_module):
        record = {"values": self.cb.last_values, "log_dir": str(trainer.log_dir)}  # log_dir: a collective
        if trainer.global_rank == 0:
            from metrics import ConceptMetrics

            cm = ConceptMetrics(clip="tiny", dino="tiny", sync_on_compute=False)
            cm.set_concept(self.cb._reference_tensors, pl_module.superclass)
            templates = self.cb.templates(trainer)
            pl_module.eval()
            out = self.cb.entries[0].sampler.sample_cells(pl_module, [(t, 0) for t in templates], seed=0)
            cm.update(out.images, out.templates)
            record["single"] = cm.compute()
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_sharded_over_two_ddp_ranks_equals_one_process(tmp_path):
    """DDP on 2 CPU processes: 3 prompts split 2 + 1, metrics all-reduced, images gathered;
    with ``choose``, every rank makes the same choice from the all-reduced scores."""
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=1, repeats=2)
    model = DreamBooth(pretrained_model="tiny", superclass=dm.superclass, learning_rate=1e-4)
    cb = SamplerValidation(samplers=SAMPLERS[1:], clip="tiny", dino="tiny", num_prompts=3, num_images=1,
                           every_n_steps=2, every_n_epochs=None, choose={"mixed": [{"guidance_concept": 1.0}, {}]})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=2, logger=CSVLogger(str(tmp_path)),
                        callbacks=[cb, _DumpOnEnd(cb, tmp_path)], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert set(r0["values"]) == {"val/mixed/clip_i", "val/mixed/clip_t", "val/mixed/dino", "val/mixed/chosen",
                                 "val/mixed/choice_0_dino", "val/mixed/choice_1_dino"}
    assert r0["values"] == r1["values"]  # every rank holds the synced values, and the same choice
    assert r0["values"]["val/mixed/chosen"] == int(r0["values"]["val/mixed/choice_1_dino"] > r0["values"]["val/mixed/choice_0_dino"])
    for k, v in r0["single"].items():
        assert r0["values"][f"val/mixed/{k}"] == pytest.approx(v, abs=1e-5)
    grid = np.asarray(Image.open(Path(r0["log_dir"]) / "images" / "val_mixed_grid_step000002.png"))
    assert grid.shape == (2 + 3 * 34, 36, 3)
    for row in range(3):  # rows 0 and 2 from rank 0, row 1 from rank 1: none left empty
        assert grid[2 + 34 * row : 34 * (row + 1), 2:34].std() > 5


def test_values_reach_callback_metrics_for_monitors(tmp_path):
    """The logged values are the trainer's callback metrics (through pl_module.log_dict), so
    ModelCheckpoint can monitor one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = SamplerValidation(samplers=[{"sampler": "concept", "num_steps": 2}], every_n_steps=2, **TINY)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/concept/clip_i", mode="max", every_n_train_steps=2)
    L.seed_everything(0)
    dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=2, repeats=1, validation_prompts="object")
    model = DreamBooth(pretrained_model="tiny", superclass=dm.superclass, learning_rate=1e-4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[cb, ckpt], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    value = cb.last_values["val/concept/clip_i"]
    assert float(trainer.callback_metrics["val/concept/clip_i"]) == pytest.approx(value, abs=1e-6)
    assert ckpt.best_model_score is not None and float(ckpt.best_model_score) == pytest.approx(value, abs=1e-6)


def test_grid_aliases_name_a_sampler_of_the_callback():
    cb = SamplerValidation(samplers=["concept", "mixed"], clip="tiny", grid_aliases={"concept": "val/images"})
    assert cb.grid_aliases == {"concept": "val/images"}
    with pytest.raises(ValueError, match="grid_aliases name no sampler"):
        SamplerValidation(samplers=["mixed"], clip="tiny", grid_aliases={"concept": "val/images"})


def test_at_train_end_scores_the_averaged_weights(tmp_path):
    """at_train_end runs once, after callbacks.EMA (listed before it) put the averaged
    weights in place: it samples the weights the module (and so the artifact) ends with,
    not the last step's; nothing runs during training."""
    from callbacks import EMA

    seen = []

    class Spy(SamplerValidation):
        def _sample_and_score(self, trainer, pl_module):
            seen.append(pl_module.unet.conv_in.weight.detach().clone())
            return super()._sample_and_score(trainer, pl_module)

    last_step = {}

    class LastStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            last_step["w"] = pl_module.unet.conv_in.weight.detach().clone()

    cb = Spy(samplers=SAMPLERS[:1], at_train_end=True, **TINY)
    rec, trainer = _fit(tmp_path, [LastStep(), EMA(decay=0.5), cb])
    module = trainer.lightning_module
    assert len(seen) == 1 and torch.equal(seen[0], module.unet.conv_in.weight)
    assert not torch.equal(seen[0], last_step["w"])  # the average, not the last step's weights
    assert set(cb.last_values) >= {"val/concept/clip_i", "val/concept/clip_t"}


def test_choose_scores_the_candidate_that_looks_most_like_the_concept(tmp_path):
    """``choose``: every candidate samples the choice cells (latents of choose_seed); the
    logged scores are each candidate's DINO over them, scored alone; the best is scored
    under the sampler's name and written as a sampler YAML. Listed in the other order, the
    same candidate wins (its index changes): the choice follows the scores, not the order.
    The tiny backbones tell the candidates apart by little, but by far more than rounding."""
    from metrics import ConceptMetrics
    from samplers.registry import sampler_from_config

    base = {"sampler": "concept", "num_steps": 4, "guidance": 3.0}
    candidates = [{"guidance": 100.0}, {}, {"guidance": 30.0, "guidance_interval": [0, 2]}]  # DINO apart by > 5e-4
    kw = dict(samplers=[base], choose={"concept": candidates}, choose_seed=7, choose_images=2, at_train_end=True, **TINY)
    cb = SamplerValidation(**kw)
    _, trainer = _fit(tmp_path, [cb], steps=1)
    module = trainer.lightning_module
    module.eval()
    templates = cb.templates(trainer)
    dino, scored = [], {}
    for overrides in candidates:
        sampler = cb.entries[0].candidates[len(dino)][1]
        assert sampler.settings() == _merged_settings(base, overrides)
        cm = ConceptMetrics(clip="tiny", dino="tiny", sync_on_compute=False)
        cm.set_concept(cb._reference_tensors, module.superclass)
        out = sampler.sample_cells(module, [(t, i) for t in templates for i in range(2)], seed=7)
        cm.update(out.images, out.templates)
        dino.append(cm.compute()["dino"])
        cm.set_concept(cb._reference_tensors, module.superclass)
        out = sampler.sample_cells(module, [(t, i) for t in templates for i in range(2)], seed=0)  # the scored cells
        cm.update(out.images, out.templates)
        scored[len(dino) - 1] = cm.compute()
    assert len(set(round(v, 4) for v in dino)) == 3  # the candidates draw different images
    best = int(np.argmax(dino))
    values = cb.last_values
    for k, v in enumerate(dino):
        assert values[f"val/concept/choice_{k}_dino"] == pytest.approx(v, abs=1e-4)
    assert values["val/concept/chosen"] == best
    for name, v in scored[best].items():  # the score is the chosen candidate's
        assert values[f"val/concept/{name}"] == pytest.approx(v, abs=1e-5)
    written = sampler_from_config(tmp_path / "samplers" / "concept.yaml")
    assert written.settings() == cb.entries[0].candidates[best][1].settings()

    rotated = SamplerValidation(**{**kw, "choose": {"concept": candidates[1:] + candidates[:1]}})
    rotated.run(trainer, module, at_end=True)  # after fit, as at_train_end runs it
    assert rotated.last_values["val/concept/chosen"] == (best - 1) % 3
    assert rotated.last_values["val/concept/dino"] == pytest.approx(values["val/concept/dino"], abs=1e-5)


def _merged_settings(base: dict, overrides: dict) -> dict:
    """The settings of the sampler ``base`` with ``overrides``, built alone."""
    from samplers import build_sampler

    settings = {k: v for k, v in {**base, **overrides}.items() if k != "sampler"}
    return build_sampler(base["sampler"], **settings).settings()


def test_choose_is_validated_before_training():
    concept = [{"sampler": "concept", "num_steps": 10}]
    with pytest.raises(ValueError, match="names no sampler"):
        SamplerValidation(samplers=concept, clip="tiny", dino="tiny", choose={"mixed": [{}, {"guidance": 2}]})
    with pytest.raises(ValueError, match="at least two"):
        SamplerValidation(samplers=concept, clip="tiny", dino="tiny", choose={"concept": [{}]})
    with pytest.raises(ValueError, match=r"candidate \{'guidance_interval': \[0, 40\]\}"):
        SamplerValidation(samplers=concept, clip="tiny", dino="tiny", choose={"concept": [{}, {"guidance_interval": [0, 40]}]})
    with pytest.raises(ValueError, match="choose by one of dino, clip_i, clip_t"):
        SamplerValidation(samplers=concept, clip="tiny", dino="tiny", choose={"concept": [{}, {"guidance": 2}]},
                          choose_by="identity")
    with pytest.raises(ValueError, match="set dino"):
        SamplerValidation(samplers=concept, clip="tiny", dino=None, choose={"concept": [{}, {"guidance": 2}]})
