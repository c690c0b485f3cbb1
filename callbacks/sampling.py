"""Validation by sampling: every N steps or epochs, run each configured sampler on the
validation prompts × image seeds, score the images with CLIP-I, CLIP-T and DINO, and log
``val/<sampler>/clip_i``, ``val/<sampler>/clip_t``, ``val/<sampler>/dino`` and one image
grid per sampler (rows prompts, columns seeds; uint8) to every logger of the trainer.
For a MiniWorld concept, ``judge: miniworld/pretrained/judge`` adds the world's ground
truth, ``val/<sampler>/identity`` and ``val/<sampler>/prompt`` (shares of images showing
the concept / what the prompt asks; :mod:`miniworld.metrics`); ``print_values: true``
prints every run's figures. ``choose`` first picks, per concept, one of several settings
of a sampler by how much its images look like the concept's own (DINO or CLIP, no ground
truth), and scores that one (the quickstart: ω = 3 at every step or over the first 25).

The (prompt, seed) cells are sharded across ranks (rank r takes cells i % world == r);
the metrics all-reduce their sums and counts, and rank 0 gathers the images for the
grids. Afterwards the module is exactly as it was: per-module train/eval flags, parameter
dtypes, the Python / NumPy / torch (CPU and CUDA) RNG states and the grad mode. A failure
while sampling or scoring is reported as a warning and the training run goes on; the
ranks agree on it first, so no rank waits in a collective that another one skipped.

    trainer:
      callbacks:
        - class_path: callbacks.SamplerValidation
          init_args:
            samplers: [{sampler: concept}, {sampler: mixed, guidance_concept: 3.5, guidance_superclass: 3.5}]
            every_n_steps: 200
            clip: openai/clip-vit-base-patch32
            dino: facebook/dino-vits16
"""

from __future__ import annotations

import random
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.image_grid import log_grid
from components.pixels import make_grid, pil_to_tensor, to_uint8
from components.compile import compiled_unet
from components.errors import settings_check
from metrics import DEFAULT_CLIP, DEFAULT_DINO, ConceptMetrics, ReferenceCache, load_clip_backbone, load_dino_backbone


@dataclass
class _Entry:
    name: str  # the key in val/<name>/...
    sampler: object  # the sampler this run scores (the chosen candidate, with ``choose``)
    kind: str = ""  # the sampler's registry name
    settings: dict = field(default_factory=dict)  # as the spec gives them
    candidates: list = field(default_factory=list)  # (overrides, sampler) pairs of ``choose``


#: metrics ``choose_by`` can name: the proxies that need no ground truth
CHOICE_METRICS = ("dino", "clip_i", "clip_t")


def _build_entries(specs) -> list[_Entry]:
    """Samplers from names, sampler YAML paths or flat mappings; validated now, before training."""
    from samplers import build_sampler
    from samplers.registry import parse_sampler_spec

    entries, seen = [], {}
    for spec in specs:
        label, name, settings = parse_sampler_spec(spec)
        seen[label] = seen.get(label, 0) + 1
        label = label if seen[label] == 1 else f"{label}_{seen[label]}"
        entries.append(_Entry(label, build_sampler(name, **settings), name, dict(settings)))
    if not entries:
        raise ValueError("SamplerValidation needs at least one sampler, e.g. samplers: [concept].")
    return entries


def _add_candidates(entries: list[_Entry], choose: dict) -> None:
    """Build and validate every candidate of ``choose`` now, before training."""
    from samplers import build_sampler

    if not isinstance(choose, dict):
        raise ValueError(f"SamplerValidation choose={choose!r}: give a mapping from a sampler of this callback to "
                         "its candidate settings, e.g. {concept: [{}, {guidance_interval: [0, 25]}]}.")
    by_name = {e.name: e for e in entries}
    unknown = sorted(set(choose) - set(by_name))
    if unknown:
        raise ValueError(f"SamplerValidation choose names no sampler of this callback: {unknown}; "
                         f"the samplers are {list(by_name)}.")
    for name, candidates in choose.items():
        if (not isinstance(candidates, (list, tuple)) or len(candidates) < 2
                or not all(isinstance(c, dict) for c in candidates)):
            raise ValueError(f"SamplerValidation choose.{name}: give a list of at least two mappings of settings "
                             "({} is the sampler as given), e.g. [{}, {guidance_interval: [0, 25]}].")
        e = by_name[name]
        for overrides in candidates:
            try:
                sampler = build_sampler(e.kind, **{**e.settings, **overrides})
            except (TypeError, ValueError) as err:
                raise ValueError(f"SamplerValidation choose.{name} candidate {overrides}: {err}") from None
            e.candidates.append((dict(overrides), sampler))


def candidate_label(overrides: dict) -> str:
    """``guidance_interval=[0, 25]``; ``as given`` for the sampler's own settings."""
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "as given"


class SamplerValidation(L.Callback):
    """Sample, score and log every ``every_n_steps`` optimizer steps and/or ``every_n_epochs`` epochs.

    Args:
        samplers: names (``"mixed"``), sampler YAML paths, or mappings ``{sampler: mixed,
            name: <log name>, <settings>}``. Built and validated at construction.
        prompts: templates with a ``{}`` slot; None: the DataModule's ``validation_templates``.
        num_prompts: keep the first N prompts (0: all); the grid rows.
        num_images: image seeds per prompt; the grid columns.
        seed: base seed; the latent of (prompt, image) is the same at every validation.
        batch_size: images per UNet batch.
        every_n_steps / every_n_epochs: when to run (0 or None: never on that count).
        clip / dino: metric backbones (hub id, folder, ``"tiny"``); None skips them.
        clip_backend, clip_t_text: see :class:`metrics.ConceptMetrics`.
        reference_images: folder of the concept's real images; None: the DataModule's
            concept images.
        superclass: CLIP-T class word; None: the module's ``superclass``.
        run_on_validate: also run at the end of ``trainer.validate``.
        at_train_end: also run once when training ends, after the callbacks listed
            before this one (``callbacks.EMA`` puts the averaged weights in place then):
            the score of the weights the artifact holds. Logged to the loggers at the last
            step (Lightning's ``callback_metrics`` take no values at that point).
        judge: a MiniWorld judge folder (``miniworld/pretrained/judge``): also log the
            ground-truth ``identity`` and ``prompt`` accuracy (MiniWorld concepts only:
            the concept folder's ``concept.json`` gives the object).
        print_values: print each run's figures (rank 0), e.g. for a quickstart's console.
        compile: ``torch.compile`` the UNet while sampling (``components.compile``: true,
            a mode, or torch.compile keywords); training stays as it is. Static
            shapes: the last batch is padded, so each validation reuses the compiled graphs.
        grid_aliases: also log a sampler's grid under other keys, ``{concept: val/images}``:
            the quickstart's ``val/images`` grid is the concept sampler's grid of this run,
            so the concept images are rendered once (no separate ImageGridLogger). Loggers
            only: the PNG in ``images/`` is the sampler's own (``val_concept_grid_*.png``).
        choose: per sampler of this callback, settings to choose from at each run, e.g.
            ``{final_concept: [{}, {guidance_interval: [0, 25]}]}`` (``{}``: the sampler as
            given; any other mapping overrides some of its settings). Before scoring, every
            candidate draws the same prompts × ``choose_images`` images from latents of its
            own seed (``choose_seed``: not the scored images); the one whose images score
            highest on ``choose_by`` is scored and logged under the sampler's name. The
            choice sees no ground truth (not the judge). Logged: ``val/<name>/chosen`` (the
            candidate's index) and ``val/<name>/choice_<k>_<choose_by>``; written:
            ``<log_dir>/samplers/<name>.yaml``, the chosen sampler as a sampler YAML
            (``sample.py --sampler_config``). The candidates share their common
            trajectory prefix (``evaluation.planner.SweepPlanner``).
        choose_by: ``dino`` (similarity to the concept's images), ``clip_i`` or ``clip_t``.
        choose_images: images per prompt for the choice.
        choose_seed: base seed of the choice's latents.
    """

    @settings_check  # a bad setting: one line from train.py, before training
    def __init__(
        self,
        samplers: list = ("concept",),
        prompts: list[str] | None = None,
        num_prompts: int = 4,
        num_images: int = 4,
        seed: int = 0,
        batch_size: int = 8,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        clip: str | None = DEFAULT_CLIP,
        dino: str | None = DEFAULT_DINO,
        clip_backend: str = "transformers",
        clip_t_text: str = "superclass",
        reference_images: str | None = None,
        superclass: str | None = None,
        run_on_validate: bool = True,
        at_train_end: bool = False,
        judge: str | None = None,
        print_values: bool = False,
        compile: bool | str | dict = False,
        grid_aliases: dict[str, str] | None = None,
        choose: dict[str, list[dict]] | None = None,
        choose_by: str = "dino",
        choose_images: int = 1,
        choose_seed: int = 1000,
    ):
        from components.compile import compile_options

        compile_options(compile)  # a bad value fails now
        self.compile, self._compiled = compile, {}
        self.entries = _build_entries(list(samplers))
        self.grid_aliases = dict(grid_aliases or {})
        unknown = sorted(set(self.grid_aliases) - {e.name for e in self.entries})
        if unknown:
            raise ValueError(f"SamplerValidation grid_aliases name no sampler of this callback: {unknown}; "
                             f"the samplers are {[e.name for e in self.entries]}.")
        if prompts is not None and any("{}" not in p for p in prompts):
            raise ValueError(f"Validation prompts need a '{{}}' slot for the subject: {[p for p in prompts if '{}' not in p][:3]}.")
        if num_images < 1:
            raise ValueError(f"num_images={num_images} must be >= 1.")
        if not clip and not dino:
            raise ValueError("SamplerValidation needs a metric backbone: set clip and/or dino (e.g. clip: tiny for tests).")
        self.prompts, self.num_prompts, self.num_images = prompts, num_prompts, num_images
        self.seed, self.batch_size = seed, batch_size
        self.every_n_steps, self.every_n_epochs = every_n_steps or 0, every_n_epochs or 0
        self.clip, self.dino, self.clip_backend, self.clip_t_text = clip, dino, clip_backend, clip_t_text
        self.reference_images, self.superclass, self.run_on_validate = reference_images, superclass, run_on_validate
        self.judge, self.print_values, self.at_train_end = judge, print_values, at_train_end
        if choose:
            _add_candidates(self.entries, choose)
            if choose_by not in CHOICE_METRICS:
                raise ValueError(f"SamplerValidation choose_by={choose_by!r}: choose by one of {', '.join(CHOICE_METRICS)} "
                                 "(the judge's figures are what the choice is checked against, never what it uses).")
            if not (dino if choose_by == "dino" else clip):
                raise ValueError(f"SamplerValidation choose_by={choose_by}: set {'dino' if choose_by == 'dino' else 'clip'} "
                                 "to its backbone, or choose by the other metric.")
            if choose_images < 1:
                raise ValueError(f"choose_images={choose_images} must be >= 1.")
        self.choose_by, self.choose_images, self.choose_seed = choose_by, choose_images, choose_seed
        if judge is not None and not (Path(judge) / "judge.safetensors").is_file():
            raise ValueError(f"SamplerValidation judge={judge!r} is not a MiniWorld judge folder (no judge.safetensors): "
                             "use miniworld/pretrained/judge, or leave judge unset.")
        self._metrics: dict[str, ConceptMetrics] | None = None
        self._cache = ReferenceCache()
        self._reference_tensors: list[torch.Tensor] | None = None
        self._last_step = -1
        self.last_values: dict[str, float] = {}  # the values logged by the last run

    # ------------------------------------------------------------------ when

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self.run(trainer, pl_module, at_end=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.run_on_validate and trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    # ------------------------------------------------------------------ what

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool = False) -> dict[str, float]:
        """One validation round; returns the logged metric values (all ranks)."""
        self._last_step = trainer.global_step
        world = trainer.world_size
        local: dict = {}
        with preserved_state(pl_module):
            choice: dict[str, float] = {}
            if any(e.candidates for e in self.entries):  # choose first: the score is the chosen sampler's
                if not self._guarded(trainer, "choice", lambda: self._sample_choices(trainer, pl_module)):
                    return {}
                try:  # all ranks reach this point: the metrics all-reduce
                    choice = self._choose()
                except Exception:  # noqa: BLE001
                    rank_zero_warn(f"SamplerValidation could not choose at step {trainer.global_step}; training goes on.\n"
                                   f"{traceback.format_exc()}")
                    return {}

            def score():
                local.update(self._sample_and_score(trainer, pl_module))

            if not self._guarded(trainer, "sampling", score):
                return {}
            # a sampler that failed on any rank is left out on every rank (compute() all-reduces)
            local["failed"] = {e.name for e in self.entries
                               if trainer.strategy.reduce_boolean_decision(e.name in local["failed"], all=False)}
            for name in local["failed"]:
                local["images"].pop(name, None)
            try:
                return self._reduce_and_log(trainer, pl_module, local, world, at_end, choice)
            except Exception:  # noqa: BLE001
                rank_zero_warn(f"SamplerValidation could not log at step {trainer.global_step}; training goes on.\n{traceback.format_exc()}")
                return {}

    @staticmethod
    def _guarded(trainer, what: str, work) -> bool:
        """Run this rank's share of ``work``; False (on every rank) if it failed on any rank."""
        failed = False
        try:
            work()
        except Exception:  # noqa: BLE001 - validation must never end the training run
            failed = True
            warnings.warn(f"SamplerValidation {what} failed on rank {trainer.global_rank} at step {trainer.global_step}; "
                          f"training goes on.\n{traceback.format_exc()}", stacklevel=3)
        if trainer.strategy.reduce_boolean_decision(failed, all=False):  # failed on any rank
            if not failed:
                rank_zero_warn(f"SamplerValidation skipped: {what} failed on another rank.")
            return False
        return True

    def templates(self, trainer) -> list[str]:
        templates = self.prompts
        if templates is None and trainer.datamodule is not None:
            templates = getattr(trainer.datamodule, "validation_templates", None)
        if not templates:
            raise ValueError("SamplerValidation has no prompts: set prompts, or use a DataModule with validation_templates.")
        return list(templates[: self.num_prompts] if self.num_prompts > 0 else templates)

    def _reference(self, trainer):
        if self.reference_images is not None:
            return self.reference_images
        if self._reference_tensors is not None:
            return self._reference_tensors
        dm = trainer.datamodule
        images = getattr(dm, "concept_images", None) if dm is not None else None
        if not images:
            raise ValueError("SamplerValidation needs the concept's real images: set reference_images to their folder, "
                             "or use a DataModule with concept_images.")
        self._reference_tensors = [pil_to_tensor(c.image) for c in images]  # (3, H, W) in [0, 1]
        return self._reference_tensors

    def _build_metrics(self, device) -> dict[str, ConceptMetrics]:
        """The metrics of each sampler; and of each ``choose`` candidate (no judge) in ``self._choice_metrics``."""
        clip = load_clip_backbone(self.clip, backend=self.clip_backend) if self.clip else None
        dino = load_dino_backbone(self.dino) if self.dino else None
        judge = None
        if self.judge:
            from miniworld.judge import load_judge

            judge = load_judge(self.judge)

        def metrics(clip, dino, judge_model):
            return ConceptMetrics(clip=None, dino=None, clip_backend=self.clip_backend, clip_t_mode=self.clip_t_text,
                                  cache=self._cache, clip_backbone=clip, dino_backbone=dino, judge_model=judge_model).to(device)

        by_dino = self.choose_by == "dino"  # a candidate's metrics: only the backbone the choice reads
        self._choice_metrics = {e.name: [metrics(None if by_dino else clip, dino if by_dino else None, None)
                                         for _ in e.candidates] for e in self.entries if e.candidates}
        return {e.name: metrics(clip, dino, judge) for e in self.entries}

    @torch.no_grad()
    def _sample_choices(self, trainer, pl_module) -> None:
        """This rank's share of the choice: every candidate samples the same cells (latents
        of ``choose_seed``), together, and its metrics take the images."""
        from evaluation.planner import SweepPlanner

        if self._metrics is None:
            self._metrics = self._build_metrics(pl_module.device)
        cells = [(t, i) for t in self.templates(trainer) for i in range(self.choose_images)]
        mine = cells[trainer.global_rank :: trainer.world_size]
        reference = self._reference(trainer)
        superclass = self.superclass or pl_module.superclass
        pl_module.eval()
        for e in self.entries:
            if not e.candidates:
                continue
            for m in self._choice_metrics[e.name]:
                m.to(pl_module.device)
                m.set_concept(reference, superclass)  # no ground truth: the choice never sees the judge
            if not mine:
                continue
            samplers = [sampler for _, sampler in e.candidates]
            for sampler in samplers:
                if hasattr(sampler, "use_concept") and trainer.datamodule is not None:
                    sampler.use_concept(getattr(trainer.datamodule, "concept_dir", None))
            planner = SweepPlanner(unet_batch=2 * self.batch_size)
            with compiled_unet(pl_module.components.unet, self.compile, self._compiled):
                outs = planner.sample(pl_module, [(sampler, mine) for sampler in samplers], seed=self.choose_seed,
                                      batch_size=self.batch_size)
            for m, out in zip(self._choice_metrics[e.name], outs):
                m.update(out.images, out.templates)

    def _choose(self) -> dict[str, float]:
        """Every rank: the candidates' scores (all-reduced), the best made each sampler's
        sampler for this run; the values to log."""
        values: dict[str, float] = {}
        for e in self.entries:
            if not e.candidates:
                continue
            scores = [m.compute()[self.choose_by] for m in self._choice_metrics[e.name]]
            best = max(range(len(scores)), key=lambda k: scores[k])  # the first of equals
            e.sampler = e.candidates[best][1]
            values[f"val/{e.name}/chosen"] = float(best)
            values.update({f"val/{e.name}/choice_{k}_{self.choose_by}": v for k, v in enumerate(scores)})
        return values

    def _write_choice(self, e: _Entry, best: int, scores: list[float], folder: Path, step: int) -> None:
        """The chosen sampler as a sampler YAML, and a line saying why."""
        import yaml

        from components.atomic import atomic_path

        overrides = e.candidates[best][0]
        config = {"sampler": e.kind, **e.settings, **overrides}
        path = folder / "samplers" / f"{e.name}.yaml"
        why = ", ".join(f"{candidate_label(o)} {v:.3f}" for (o, _), v in zip(e.candidates, scores))
        with atomic_path(path) as tmp:
            tmp.write_text(f"# chosen at step {step} by {self.choose_by}, {self.choose_images} image(s) per prompt "
                           f"(seed {self.choose_seed}): {why}\n" + yaml.safe_dump(config, sort_keys=False))
        if self.print_values:
            print(f"[validation step {step}] {e.name}: chose {candidate_label(overrides)} by {self.choose_by} ({why}); "
                  f"as a sampler YAML: {path}", flush=True)

    def _truth(self, trainer):
        """The MiniWorld concept's ground-truth object, for the judge's identity accuracy."""
        if not self.judge:
            return None
        from miniworld.concepts import read_concept_truth

        folder = self.reference_images
        if folder is None and trainer.datamodule is not None:
            folder = getattr(trainer.datamodule, "concept_dir", None)
        truth = read_concept_truth(folder) if folder else None
        if truth is None:
            raise ValueError(f"SamplerValidation judge: {folder} is not a MiniWorld concept folder (no concept.json with "
                             "the object): train on concept_dir: miniworld:<concept>, or leave judge unset.")
        return truth

    @torch.no_grad()
    def _sample_and_score(self, trainer, pl_module) -> dict:
        """This rank's share: sample its cells with each sampler and update the metrics."""
        if self._metrics is None:
            self._metrics = self._build_metrics(pl_module.device)
        templates = self.templates(trainer)
        cells = [(t, i) for t in templates for i in range(self.num_images)]  # template-major: the grid order
        mine = list(range(trainer.global_rank, len(cells), trainer.world_size))
        reference = self._reference(trainer)
        superclass = self.superclass or pl_module.superclass
        truth = self._truth(trainer)
        pl_module.eval()
        local = {"cells": len(cells), "rows": len(templates), "mine": mine, "images": {}, "cost": {}, "failed": set()}
        for e in self.entries:
            metrics = self._metrics[e.name]
            metrics.to(pl_module.device)
            metrics.set_concept(reference, superclass, truth=truth)  # embeddings cached after the first time
            if not mine:
                continue
            if hasattr(e.sampler, "use_concept") and trainer.datamodule is not None:
                e.sampler.use_concept(getattr(trainer.datamodule, "concept_dir", None))  # reference-guided: the source images
            try:  # each sampler on its own: one that fails does not silence the others
                with compiled_unet(pl_module.components.unet, self.compile, self._compiled):
                    out = e.sampler.sample_cells(pl_module, [cells[k] for k in mine], seed=self.seed,
                                                 batch_size=self.batch_size)
                metrics.update(out.images, out.templates)
            except Exception:  # noqa: BLE001 - validation must never end the training run
                local["failed"].add(e.name)
                warnings.warn(f"SamplerValidation: sampler {e.name!r} failed on rank {trainer.global_rank} at step "
                              f"{trainer.global_step}; the other samplers are logged, training goes on.\n"
                              f"{traceback.format_exc()}", stacklevel=2)
                continue
            local["images"][e.name] = to_uint8(out.images)  # (n, H, W, 3)
            local["cost"][e.name] = out.cost
        return local

    def _reduce_and_log(self, trainer, pl_module, local: dict, world: int, at_end: bool = False,
                        choice: dict[str, float] | None = None) -> dict[str, float]:
        values: dict[str, float] = dict(choice or {})
        for e in self.entries:  # the same order on every rank: compute() all-reduces
            if e.name in local.get("failed", ()):
                continue
            for k, v in self._metrics[e.name].compute().items():
                values[f"val/{e.name}/{k}"] = v
        gathered = [(local["mine"], local["images"])]
        if world > 1 and dist.is_available() and dist.is_initialized():
            gathered = [None] * world
            dist.all_gather_object(gathered, (local["mine"], local["images"]))
        # callback_metrics (for ModelCheckpoint/EarlyStopping monitors) through the module's log;
        # the loggers get the values below at this very step (self.log's on_step values would
        # reach them only every log_every_n_steps). Already all-reduced: no sync.
        if not at_end:  # Lightning takes no self.log once training has ended
            pl_module.log_dict(values, logger=False, sync_dist=False)
        self.last_values = values
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank reads it
        if not trainer.is_global_zero:
            return values
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        for e in self.entries:
            if e.candidates and f"val/{e.name}/chosen" in values:
                scores = [values[f"val/{e.name}/choice_{k}_{self.choose_by}"] for k in range(len(e.candidates))]
                self._write_choice(e, int(values[f"val/{e.name}/chosen"]), scores, Path(log_dir), step)
        if self.print_values:
            for e in self.entries:
                mine = {k.rsplit("/", 1)[1]: v for k, v in values.items() if k.startswith(f"val/{e.name}/")
                        and not k.rsplit("/", 1)[1].startswith(("chosen", "choice_"))}  # printed with the choice
                text = " ".join(f"{k} {100 * v:.1f}%" if k in ("identity", "prompt") else f"{k} {v:.3f}"
                                for k, v in mine.items())
                print(f"[validation step {step}] {e.name}: {text}", flush=True)
        templates = self.templates(trainer)
        for e in self.entries:
            grid = _assemble(gathered, e.name, local["cells"])
            if grid is not None:
                grid = make_grid(grid, rows=local["rows"])
                log_grid(trainer, f"val/{e.name}/grid", grid, " | ".join(templates), step, log_dir=log_dir)
                if e.name in self.grid_aliases:
                    log_grid(trainer, self.grid_aliases[e.name], grid, " | ".join(templates), step, png=False)
        return values


def _assemble(gathered, name: str, n: int) -> np.ndarray | None:
    """Images of all ranks back in cell order: (n, H, W, 3) uint8."""
    parts = [(idx, imgs[name]) for idx, imgs in gathered if name in imgs]
    if not parts:
        return None
    h, w = parts[0][1].shape[1:3]
    out = np.zeros((n, h, w, 3), dtype=np.uint8)
    for idx, imgs in parts:
        out[idx] = imgs
    return out


# --------------------------------------------------------------------------- state


@contextmanager
def preserved_state(module: torch.nn.Module):
    """Restore, on exit, every submodule's train/eval flag, every parameter's and buffer's
    dtype, the Python, NumPy and torch (CPU, CUDA) RNG states, and the grad mode."""
    modes = [(m, m.training) for m in module.modules()]
    dtypes = {name: t.dtype for name, t in [*module.named_parameters(), *module.named_buffers()]}
    py_state, np_state = random.getstate(), np.random.get_state()  # torch's CPU and CUDA RNGs: fork_rng
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    grad = torch.is_grad_enabled()
    try:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            yield
    finally:
        for m, training in modes:
            m.training = training
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name in dtypes and t.dtype != dtypes[name]:
                t.data = t.data.to(dtypes[name])
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_grad_enabled(grad)
