"""Evaluation runs: a model (base or trained artifact) × subjects × sampler settings.

The plan is every *cell* (subject, sampler setting); each cell samples the subject's
prompt templates × ``num_images`` images, scores them with CLIP-I, CLIP-T and DINO, and
becomes one row of ``results.csv``. A rerun skips the cells already in the table. On
several ranks, rank r takes the pending cells i with i % world == r (with ``share``: the
pending subjects i with i % world == r, each with all its settings), appends its rows to
its own part file, and rank 0 merges the table, writes the per-setting summary (mean
over subjects) and the Pareto plots, and logs them to W&B when a run is active.

    cfg = EvalConfig(model="tiny", dreambooth_root="dreambooth", subjects=["dog"],
                     sweep=[{"sampler": "mixed", "zip": {...}}], output="outputs/eval")
    rows = run_evaluation(cfg)                      # one process
    rows = run_evaluation(cfg, fabric_ranks(cfg))   # one rank of a Lightning Fabric DDP run
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from components.errors import UserError
from components.loader import cache_dir
from components.runs import check_identity, write_identity
from evaluation.pareto import plot_pareto, summarize
from evaluation.results import COLUMNS, ResultStore, cell_key
from evaluation.subjects import Subject, dreambooth_subjects, folder_subject
from evaluation.sweep import SweepPoint, expand_sweep
from metrics import DEFAULT_CLIP, DEFAULT_DINO, ConceptMetrics, ReferenceCache


@dataclass
class EvalConfig:
    """One evaluation run (the keys of a ``configs/eval/*.yaml`` file; evaluate.py's options).

    Model: ``model`` and/or ``artifact``. Subjects: ``dreambooth_root`` (+ ``subjects``,
    default all) or ``concept_dir`` + ``superclass``. ``judge``: a MiniWorld judge folder:
    also the ground-truth ``identity`` and ``prompt`` accuracy of MiniWorld concepts
    (:mod:`miniworld.metrics`). Work: ``share`` samples all pending settings of a subject
    together through :class:`evaluation.planner.SweepPlanner` (shared trajectory prefixes,
    UNet calls of ``unet_batch`` rows); off, each setting samples on its own in batches of
    ``batch_size`` images.

    Args:
        model: base model: diffusers folder, hub id or 'tiny' (with artifact: overrides its base).
        artifact: trained artifact folder; '{subject}' in it becomes each subject's name.
        dreambooth_root: DreamBooth-layout root: one folder per subject + prompts_and_classes.txt.
        subjects: subject names under dreambooth_root (default: all).
        concept_dir: a single concept's image folder instead ('demo': the synthetic demo concept;
            'miniworld:<concept>': a MiniWorld concept, with its prompts.txt).
        superclass: class word of concept_dir.
        prompts: 'auto' (the DreamBooth set of the class), 'object', 'live', a file of templates, or a list.
        num_prompts: keep the first N prompts (0: all).
        num_images: images per prompt (the study uses 10).
        seed: base seed of the per-(prompt, image) latents.
        batch_size: images per sampler run (cells sampled together).
        sweep: sampler settings to evaluate: a list of entries (evaluation/sweep.py), or a sweep YAML file.
        defaults: settings given to every sampler of the sweep, e.g. {num_steps: 25}.
        clip: CLIP hub id or folder ('tiny': tiny random backbone).
        dino: DINO / DINOv2 hub id or folder, e.g. facebook/dinov2-small ('tiny', 'tiny-dinov2'); null: no DINO.
        clip_backend: transformers or open_clip.
        clip_t_text: CLIP-T text: the slot filled with the superclass word (superclass), or removed (remove).
        judge: MiniWorld judge folder (miniworld/pretrained/judge): also the ground-truth identity and prompt
            accuracy of MiniWorld concepts.
        output: output folder (results.csv, plots, grids).
        device: device of a single-process run: auto, cpu, cuda, cuda:1.
        devices: ranks per node; > 1 runs Lightning Fabric DDP.
        accelerator: Fabric accelerator: auto, gpu, cpu.
        num_nodes: nodes of a Fabric run (SLURM / torchrun).
        save_grids: save image grids (rows prompts, columns images).
        wandb_project: log the tables and plots to this W&B project (WANDB_MODE=offline works).
        wandb_name: W&B run name.
        log_grids: also log every cell's image grid to W&B.
        share: sample all settings of a subject together (shared trajectory prefixes, packed UNet batches; the
            same images to float rounding); false: each setting on its own.
        unet_batch: rows per UNet call when settings are shared (32-64 on a GPU).
        compile: torch.compile the UNet (static shapes): true/false, default, reduce-overhead, max-autotune,
            max-autotune-no-cudagraphs, or a mapping of torch.compile keywords.
        dtype: model dtype for sampling (float32, bfloat16, float16; metrics stay fp32).
    """

    model: str | None = None
    artifact: str | None = None
    dreambooth_root: str | None = None
    subjects: list[str] | None = None
    concept_dir: str | None = None
    superclass: str | None = None
    prompts: str | list[str] = "auto"
    num_prompts: int = 0
    num_images: int = 4
    seed: int = 0
    batch_size: int = 8
    sweep: list[dict] = field(default_factory=lambda: [{"sampler": "concept"}])
    defaults: dict = field(default_factory=dict)
    clip: str | None = DEFAULT_CLIP
    dino: str | None = DEFAULT_DINO
    clip_backend: str = "transformers"
    clip_t_text: str = "superclass"
    judge: str | None = None
    output: str = "outputs/eval"
    device: str = "auto"
    devices: int = 1
    accelerator: str = "auto"
    num_nodes: int = 1
    save_grids: bool = True
    wandb_project: str | None = None
    wandb_name: str | None = None
    log_grids: bool = False
    share: bool = True
    unet_batch: int = 32
    compile: bool | str | dict = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # settings that would only fail after the models load (or divide by zero), checked now
        for key in ("num_images", "batch_size", "unet_batch", "devices", "num_nodes"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} is {getattr(self, key)}: it must be 1 or more",
                                fix=f"--{key.replace('_', '-')} 1 (or more)")
        if self.num_prompts < 0:
            raise UserError(f"num_prompts is {self.num_prompts}", fix="--num-prompts 0 (all prompts) or more")

    def identity(self) -> dict:
        """What makes two runs' rows comparable; a rerun into the same output must match."""
        keys = ("model", "artifact", "prompts", "num_prompts", "num_images", "seed", "clip", "dino", "clip_backend", "clip_t_text")
        out = {k: getattr(self, k) for k in keys}
        if self.judge:  # only when set, so folders written before the judge existed still match
            out["judge"] = self.judge
        return out


@dataclass
class Ranks:
    """Where this process stands in a (possibly) distributed run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    barrier: Callable[[], None] = lambda: None


def resolve_device(device: str) -> torch.device:
    from lightning_modules.loading import resolve_device as resolve

    return resolve(device)


def fabric_ranks(cfg: EvalConfig) -> Ranks:
    """Launch (or join) a Lightning Fabric DDP run of ``cfg.devices`` × ``cfg.num_nodes`` ranks."""
    import lightning as L

    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy="ddp")
    fabric.launch()
    return Ranks(fabric.global_rank, fabric.world_size, fabric.device, fabric.barrier)


def build_subjects(cfg: EvalConfig) -> list[Subject]:
    if cfg.dreambooth_root:
        subjects = dreambooth_subjects(cfg.dreambooth_root, cfg.subjects, cfg.prompts)
    elif cfg.concept_dir:
        subjects = [folder_subject(cfg.concept_dir, cfg.superclass or "", cfg.prompts)]
    else:
        raise ValueError("No subjects: set dreambooth_root (+ subjects) or concept_dir + superclass.")
    if cfg.num_prompts > 0:
        for s in subjects:
            s.templates = s.templates[: cfg.num_prompts]
    return subjects


class ModelSource:
    """Loads the model of each subject once (:func:`lightning_modules.loading.load_model`): the
    base model (components shared by all subjects) or the subject's trained artifact."""

    def __init__(self, cfg: EvalConfig, device: torch.device):
        if cfg.model is None and not cfg.artifact:
            raise ValueError("Nothing to evaluate: set model (hub id, folder, 'tiny') and/or artifact (a trained artifact folder).")
        from components.compile import compile_options
        from components.loader import as_dtype

        compile_options(cfg.compile)  # bad values fail before any model loads
        self.cfg, self.device, self.dtype = cfg, device, as_dtype(cfg.dtype)
        self._components = None
        self._current: tuple[str, object] | None = None

    def get(self, subject: Subject):
        if self._current is not None and self._current[0] == subject.name:
            return self._current[1]
        self._current = None  # free the previous subject's model first
        from lightning_modules.loading import load_model

        artifact = self.cfg.artifact.format(subject=subject.name) if self.cfg.artifact else None
        model = load_model(self.cfg.model, artifact, superclass=None if artifact else subject.superclass,
                           device=self.device, dtype=self.dtype, compile=self.cfg.compile, components=self._components)
        if artifact is None:
            self._components = model.components  # loaded once, shared by every subject
        self._current = (subject.name, model)
        return model


def evaluate_cell(model, sampler, subject: Subject, metrics: ConceptMetrics, num_images: int, seed: int,
                  batch_size: int, grid_path: Path | None = None) -> dict:
    """Sample one subject's templates × ``num_images`` with one sampler and score them.

    Templates go to the sampler a few at a time (about ``batch_size`` images per call),
    so memory stays bounded; the latents depend only on (template, image index, seed).
    """
    from components.pixels import make_grid, to_uint8

    metrics.set_concept(subject.images, subject.superclass)
    if hasattr(sampler, "use_concept"):
        sampler.use_concept(subject.images)  # reference-guided generation: the subject's source images
    per_call = max(1, batch_size // num_images)
    evals, max_batch, n, kept = 0.0, 0, 0, []
    start = time.perf_counter()
    for i in range(0, len(subject.templates), per_call):
        out = sampler.sample(model, subject.templates[i : i + per_call], num_images=num_images, seed=seed,
                             batch_size=batch_size, progress=False)
        metrics.update(out.images, out.templates)
        evals += out.cost["unet_evals_per_image"] * len(out.images)
        max_batch = max(max_batch, int(out.cost["max_unet_batch"]))
        n += len(out.images)
        if grid_path is not None:
            kept.append(to_uint8(out.images))
    values = metrics.compute()
    if grid_path is not None:
        import numpy as np
        from PIL import Image

        grid_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_grid(np.concatenate(kept), rows=len(subject.templates))).save(grid_path)
    return {**{k: values.get(k, float("nan")) for k in ("clip_i", "clip_t", "dino", "identity", "prompt")},
            "unet_evals_per_image": evals / max(n, 1), "max_unet_batch": max_batch, "num_images": n,
            "seconds": round(time.perf_counter() - start, 3)}


def evaluate_points(model, points: list[SweepPoint], subject: Subject, metrics: ConceptMetrics, num_images: int,
                    seed: int, batch_size: int, planner, grid_paths: list[Path | None] | None = None) -> list[dict]:
    """:func:`evaluate_cell` for many settings of one subject at once, through the planner.

    Templates go a few at a time (about ``batch_size`` images) to the planner with every
    setting, so the settings share trajectory prefixes and fill UNet batches; each
    setting keeps its own metric state. ``seconds`` is the subject's time over its
    settings (they are computed together).
    """
    from components.pixels import make_grid, to_uint8

    metrics.set_concept(subject.images, subject.superclass)
    samplers = [p.build() for p in points]
    fresh = metrics.get_state()
    states = [fresh] * len(points)
    acc = [{"evals": 0.0, "max_batch": 0, "n": 0, "kept": []} for _ in points]
    per_call = max(1, batch_size // num_images)
    start = time.perf_counter()
    for i in range(0, len(subject.templates), per_call):
        cells = [(t, k) for t in subject.templates[i : i + per_call] for k in range(num_images)]
        outs = planner.sample(model, [(s, cells) for s in samplers], seed=seed, batch_size=batch_size)
        for j, out in enumerate(outs):
            metrics.set_state(states[j])
            metrics.update(out.images, out.templates)
            states[j] = metrics.get_state()
            a = acc[j]
            a["evals"] += out.cost["unet_evals_per_image"] * len(out.images)
            a["max_batch"] = max(a["max_batch"], int(out.cost["max_unet_batch"]))
            a["n"] += len(out.images)
            if grid_paths is not None and grid_paths[j] is not None:
                a["kept"].append(to_uint8(out.images))
    seconds = (time.perf_counter() - start) / max(len(points), 1)
    rows = []
    for j, a in enumerate(acc):
        metrics.set_state(states[j])
        values = metrics.compute()
        if a["kept"]:
            import numpy as np
            from PIL import Image

            grid_paths[j].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(make_grid(np.concatenate(a["kept"]), rows=len(subject.templates))).save(grid_paths[j])
        rows.append({**{k: values.get(k, float("nan")) for k in ("clip_i", "clip_t", "dino", "identity", "prompt")},
                     "unet_evals_per_image": a["evals"] / max(a["n"], 1), "max_unet_batch": a["max_batch"],
                     "num_images": a["n"], "seconds": round(seconds, 3)})
    return rows


def _grid_path(output: Path, subject: str, point: SweepPoint) -> Path:
    tag = hashlib.sha256(point.settings_json.encode()).hexdigest()[:6]
    name = re.sub(r"[^A-Za-z0-9=.,_-]+", "_", f"{point.sampler}_{point.label}")[:80]
    return output / "grids" / subject / f"{name}_{tag}.png"


def _check_identity(output: Path, cfg: EvalConfig) -> None:
    """Refuse an output folder holding results of another evaluation. A folder without
    results is free, whatever its run.json says (a run that failed before its first cell)."""
    ident = cfg.identity()
    rows = bool(ResultStore(output).rows()) if output.exists() else False
    check_identity(output, ident, in_use=rows,
                   problem="{folder} holds results of another evaluation ({changes}); its rows would not be comparable",
                   fix="choose another output folder, or delete this one to start again")
    write_identity(output, ident)


def run_evaluation(cfg: EvalConfig, ranks: Ranks | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the pending cells of this rank; on rank 0, merge, summarize, plot and log.

    Returns the merged rows on rank 0, this rank's new rows elsewhere.
    """
    if cfg.model is None and not cfg.artifact:
        raise ValueError("Nothing to evaluate: set model (hub id, folder, 'tiny') and/or artifact (a trained artifact folder).")
    ranks = ranks or Ranks(device=resolve_device(cfg.device))
    output = Path(cfg.output)
    subjects = build_subjects(cfg)
    points = expand_sweep(cfg.sweep, cfg.defaults)  # validates every setting before any work
    if ranks.rank == 0:
        _check_identity(output, cfg)
    ranks.barrier()
    store = ResultStore(output)
    plan = [(s, p) for s in subjects for p in points]  # subject-major: each rank loads few models
    keys = [cell_key(s.name, p.sampler, p.settings_json) for s, p in plan]
    done = store.done_keys()
    ranks.barrier()  # every rank has read the same table before any rank appends to it
    pending = [(cell, k) for cell, k in zip(plan, keys) if k not in done]
    if cfg.share:  # whole subjects per rank, so that a subject's settings share work
        names = list(dict.fromkeys(s.name for (s, _), _ in pending))
        mine = [c for c in pending if names.index(c[0][0].name) % ranks.world == ranks.rank]
    else:
        mine = pending[ranks.rank :: ranks.world]
    if ranks.rank == 0:
        log(f"[eval] {len(plan)} cells, {len(plan) - len(pending)} done, {len(pending)} to run on {ranks.world} rank(s)")
    new_rows = []
    if mine:
        metrics = ConceptMetrics(cfg.clip, cfg.dino, cfg.clip_backend, cfg.clip_t_text,
                                 cache=ReferenceCache(cache_dir() / "reference-embeddings"), sync_on_compute=False,
                                 judge=cfg.judge)
        metrics.to(ranks.device)
        models = ModelSource(cfg, ranks.device)
        if cfg.share:
            from evaluation.planner import SweepPlanner

            planner = SweepPlanner(unet_batch=cfg.unet_batch)
            done_points = 0
            from samplers import SAMPLERS

            alone = [c for c in mine if not getattr(SAMPLERS.get(c[0][1].sampler), "plannable", True)]
            shared = [c for c in mine if c not in alone]  # reference-guided runs on its own, below
            for name in dict.fromkeys(s.name for (s, _), _ in shared):
                subject = next(s for (s, _), _ in shared if s.name == name)
                cells = [(p, k) for (s, p), k in shared if s.name == name]
                points = [p for p, _ in cells]
                grids = [_grid_path(output, subject.name, p) for p in points] if cfg.save_grids else None
                before = (planner.stats.naive_rows, planner.stats.rows)
                values = evaluate_points(models.get(subject), points, subject, metrics, cfg.num_images, cfg.seed,
                                         cfg.batch_size, planner, grids)
                naive, rows_run = planner.stats.naive_rows - before[0], planner.stats.rows - before[1]
                log(f"[eval rank {ranks.rank}] {subject.name}: {len(points)} settings sampled together, "
                    f"{rows_run} UNet rows instead of {naive} ({naive / max(rows_run, 1):.2f}x less UNet work)")
                for (point, key), v in zip(cells, values):
                    row = {"subject": subject.name, "sampler": point.sampler, "curve": point.curve,
                           "setting": point.label, **v, "settings": point.settings_json, "key": key}
                    store.append(row, ranks.rank)
                    new_rows.append(row)
                    done_points += 1
                    judged = f" identity {100 * row['identity']:.1f}% prompt {100 * row['prompt']:.1f}%" if cfg.judge else ""
                    log(f"[eval rank {ranks.rank}] {done_points}/{len(mine)} {subject.name} {point.sampler} "
                        f"{point.label}: CLIP-I {row['clip_i']:.4f} CLIP-T {row['clip_t']:.4f} DINO {row['dino']:.4f}{judged}")
            mine = alone
        for j, ((subject, point), key) in enumerate(mine):
            grid = _grid_path(output, subject.name, point) if cfg.save_grids else None
            values = evaluate_cell(models.get(subject), point.build(), subject, metrics, cfg.num_images, cfg.seed,
                                   cfg.batch_size, grid)
            row = {"subject": subject.name, "sampler": point.sampler, "curve": point.curve, "setting": point.label,
                   **values, "settings": point.settings_json, "key": key}
            store.append(row, ranks.rank)
            new_rows.append(row)
            judged = f" identity {100 * row['identity']:.1f}% prompt {100 * row['prompt']:.1f}%" if cfg.judge else ""
            log(f"[eval rank {ranks.rank}] {j + 1}/{len(mine)} {subject.name} {point.sampler} {point.label}: "
                f"CLIP-I {row['clip_i']:.4f} CLIP-T {row['clip_t']:.4f} DINO {row['dino']:.4f}{judged} ({row['seconds']:.1f} s)")
    ranks.barrier()
    if ranks.rank != 0:
        return new_rows
    rows = store.merge(order=keys)
    finish(rows, output, cfg, [_grid_path(output, s.name, p) for s, p in plan] if cfg.log_grids else [])
    return rows


def finish(rows: list[dict], output: Path, cfg: EvalConfig | None = None, grids: list[Path] = ()) -> list[dict]:
    """Summary table (mean over subjects, Pareto flags), Pareto plots, and W&B logging."""
    summary = summarize(rows)
    cols = ["curve", "sampler", "setting", "clip_i", "clip_t", "dino", "identity", "prompt", "unet_evals_per_image",
            "max_unet_batch", "subjects", "pareto", "settings"]
    with (output / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    plots = {"clip_i": plot_pareto(summary, output / "pareto.png", y="clip_i")}
    if any(r["dino"] == r["dino"] for r in summary):  # not all NaN
        plots["dino"] = plot_pareto(summary, output / "pareto_dino.png", y="dino")
    if any(r["identity"] == r["identity"] for r in summary):  # a MiniWorld judge was used
        plots["judge"] = plot_pareto(summary, output / "pareto_judge.png", x="prompt", y="identity")
    _log_wandb(rows, summary, plots, grids)
    return summary


def _log_wandb(rows, summary, plots, grids) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    cols = ["subject", "sampler", "setting", "clip_i", "clip_t", "dino", "identity", "prompt", "unet_evals_per_image"]
    payload = {
        "eval/results": wandb.Table(columns=COLUMNS, data=[[r.get(c, math.nan) for c in COLUMNS] for r in rows]),
        "eval/summary": wandb.Table(columns=cols[1:] + ["pareto"], data=[[r[c] for c in cols[1:] + ["pareto"]] for r in summary]),
    }
    for y, path in plots.items():
        payload[f"eval/pareto_{y}"] = wandb.Image(str(path))
    from PIL import Image

    for path in grids:
        if path.exists():
            payload[f"eval/grids/{path.parent.name}/{path.stem}"] = wandb.Image(Image.open(path).convert("RGB"))
    wandb.log(payload)
