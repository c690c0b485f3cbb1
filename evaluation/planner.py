"""Sweeps that share work: many sampler settings over the same cells, planned together.

In a sweep, the settings of one cell (same prompt, image index and seed, so the same
x_T) follow the same trajectory for a while: every setting evaluates u, c, s at x_T in
step 0; switching with t_sw = k follows superclass sampling for k steps; masked
settings that differ in q share their first t_sw steps; multi-stage with ω_s + ω_c = 7
shares superclass sampling's first t_sw steps; Photoswap triples share the steps where
their injection flags agree. :class:`SweepPlanner` runs every (setting, cell batch) of a
sweep at once and

* **shares**: a UNet row that two runs would compute identically is computed once.
  Runs are placed on a tree of trajectory states: the root is x_T of the cells, and a
  run's state after step i is its parent's child by the sampler's
  :meth:`samplers.base.Sampler.step_key` of step i (same key, same arithmetic, so the
  same latent bit for bit). A prediction at a state's latent for a prompt kind is
  computed once for all runs at that state, whatever each does with it; equal keys
  share the rest of the step (a second trajectory, a fused latent) too.
* **packs**: the rows every run asks for in a round (one ``predict`` call each) go
  through the UNet in batches of ``unet_batch`` rows, mixing settings, cells and
  timesteps (the UNet takes one timestep per row). Calls with an attention control
  (masked after t_sw, Photoswap's injection) keep their rows together; the other rows
  fill the rest of the batch, and each run's control sees only its own rows
  (:class:`components.attention.SegmentedProcessor`).

Samplers are not changed: each run executes the sampler's own loop (``run_loop``,
``step``, ``guide``) in a worker thread that hands its UNet requests to the planner and
waits; only one thread runs at a time, so the order of work, hence every image, is
deterministic. Images equal the unshared run up to float rounding of the different
batch composition (tests: ≤ 1e-5). The guidance arithmetic and the DDIM update of a
shared prefix are repeated per run; they are not UNet work (< 2% of sampling time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from components.conditioning import cat
from components.attention import SegmentedProcessor, planned
from samplers.base import Run, Sampler, SampleOutput, _check_model, decode


class _Abort(BaseException):
    """Raised in a worker thread whose plan was abandoned (another run failed)."""


class _Worker:
    """A run's loop in a thread that runs only while the planner waits for it."""

    def __init__(self, target):
        self.target, self.request, self.response, self.result, self.error = target, None, None, None, None
        self.done = False
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._started = False

    def _main(self):
        self._go.acquire()
        try:
            if not isinstance(self.response, _Abort):
                with torch.no_grad():
                    self.result = self.target(self)
        except _Abort:
            pass
        except BaseException as e:  # handed to the planner, re-raised there
            self.error = e
        self.done, self.request = True, None
        self._back.release()

    def wait(self, request):
        """In the worker: hand ``request`` to the planner; return its response."""
        self.request = request
        self._back.release()
        self._go.acquire()
        if isinstance(self.response, _Abort):
            raise self.response
        return self.response

    def resume(self, response=None):
        """In the planner: run the worker until its next request (or its end)."""
        self.response = response
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._back.acquire()
        if self.error is not None:
            raise self.error

    def abort(self):
        if not self.done:
            self.response = _Abort()
            if not self._started:
                self._started = True
                self._thread.start()
            self._go.release()
            self._back.acquire()


@dataclass
class _Item:
    key: object  # sharing key, or None
    x: torch.Tensor  # (rows, C, h, w), already scaled for the scheduler
    context: torch.Tensor  # (rows, L, D) conditioning (components.conditioning)
    t: torch.Tensor  # (rows,) timesteps


@dataclass
class _Request:
    items: list[_Item]  # one per branch (or one for a controlled call)
    control: object = None  # attention control of the whole call, or None


class PlannedRun(Run):
    """A :class:`Run` whose UNet rows go through the planner."""

    def __init__(self, planner: "SweepPlanner", worker: _Worker, *args):
        super().__init__(*args)
        self.planner, self.worker = planner, worker
        self.control = None  # set by components.attention.attention_control in this thread
        self.node = planner.node(("root", tuple(self.cells), self.seed, len(self.scheduler.timesteps)))
        self.key, self.calls, self.z = None, 0, None

    def start_step(self, i: int, key, z: torch.Tensor) -> None:
        if i > 0:
            self.node = self.planner.node((self.node, self.key)) if self.key is not None else self.planner.node(None)
        self.key, self.calls, self.z = key, 0, z

    def embeddings(self, kind: str, t) -> torch.Tensor:
        step = int(t) if self.model.timestep_dependent else None
        key = (kind, tuple(self.prompts[kind]), step)
        cache = self.planner.embedding_cache
        if key not in cache:
            cache[key] = super().embeddings(kind, t)
        return cache[key]

    def forward(self, x, t, context, branches) -> torch.Tensor:
        n, b = len(branches), self.batch
        control = self.control
        controlled = control is not None and (control.wants(True) or control.wants(False))
        t_rows = t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t
        call = self.calls
        self.calls += 1
        if controlled:
            request = _Request([_Item(None, x, context, t_rows)], control)
        else:
            items = []
            for k, (z, kind) in enumerate(branches):
                rows = slice(k * b, (k + 1) * b)
                if z is self.z:
                    key = ("node", self.node, kind, int(t))  # a prediction at this state's latent
                elif self.key is not None:
                    key = ("call", self.node, self.key, call, k)  # same state, same step: same rows
                else:
                    key = None
                items.append(_Item(key, x[rows], context[rows], t_rows[rows]))
            request = _Request(items)
        return self.worker.wait(request)


@dataclass
class PlanStats:
    """UNet work of a planned sweep: rows asked for by the runs (what running every
    setting on its own costs) and rows computed."""

    naive_rows: int = 0
    rows: int = 0
    padded_rows: int = 0
    calls: int = 0
    rounds: int = 0

    def add(self, other: "PlanStats") -> None:
        for k in ("naive_rows", "rows", "padded_rows", "calls", "rounds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


class _Segments:
    def __init__(self):
        self.segments: list = []


@dataclass
class SweepPlanner:
    """Samples many (sampler, cells) jobs together, sharing and packing UNet work.

    ``unet_batch``: rows per UNet call (32-64 fill a GPU; the last call of a round is
    padded to it when ``pad`` is set or the UNet is compiled, so it sees one shape).
    """

    unet_batch: int = 32
    pad: bool = False
    stats: PlanStats = field(default_factory=PlanStats)

    def __post_init__(self):
        if self.unet_batch < 1:
            raise ValueError(f"unet_batch={self.unet_batch} must be >= 1 (rows per UNet call)")
        self._nodes: dict = {}
        self.embedding_cache: dict = {}
        self._pad = self.pad

    def node(self, key) -> int:
        """The id of a trajectory state (None: a fresh state nobody shares)."""
        if key is None:
            self._nodes[object()] = len(self._nodes)
            return len(self._nodes) - 1
        return self._nodes.setdefault(key, len(self._nodes))

    @torch.no_grad()
    def sample(self, model, jobs: Sequence[tuple[Sampler, Sequence[tuple[str, int]]]], seed: int = 0,
               batch_size: int = 8) -> list[SampleOutput]:
        """One :class:`SampleOutput` per (sampler, cells) job, as ``sampler.sample_cells``
        with the same seed and batch size would give it (up to float rounding)."""
        _check_model(model)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (images per UNet batch)")
        from components.personalized import fill

        self._nodes, self.embedding_cache = {}, {}
        workers: list[tuple[int, _Worker]] = []
        for j, (sampler, cells) in enumerate(jobs):
            cells = list(cells)
            for template, _ in cells:
                fill(template, "x")
            for start in range(0, len(cells), batch_size):
                workers.append((j, _Worker(self._loop(model, sampler, cells[start : start + batch_size], seed))))
        from components.compile import is_compiled

        unet = model.components.unet
        self._pad = self.pad or is_compiled(unet)  # a compiled UNet sees one shape
        self._components = model.components  # the backbone's denoiser call (components.backbones)
        original = dict(unet.attn_processors)
        segments = self._segments = _Segments()
        unet.set_attn_processor({name: SegmentedProcessor(p, segments) for name, p in original.items()})
        try:
            waiting = []
            for _, w in workers:
                w.resume()
                if not w.done:
                    waiting.append(w)
            while waiting:
                responses = self._execute(unet, [w.request for w in waiting], segments)
                still = []
                for w, response in zip(waiting, responses):
                    w.resume(response)
                    if not w.done:
                        still.append(w)
                waiting = still
        finally:
            for _, w in workers:
                w.abort()
            unet.set_attn_processor(original)
            self.embedding_cache = {}
        outputs = []
        for j, (sampler, cells) in enumerate(jobs):
            parts = [w.result for k, w in workers if k == j]
            rows = sum(p[1] for p in parts)
            cost = {"unet_evals_per_image": rows / max(len(cells), 1), "max_unet_batch": max((p[2] for p in parts), default=0)}
            images = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, 3, 0, 0)
            outputs.append(SampleOutput(images, [t for t, _ in cells], [i for _, i in cells], cost))
        return outputs

    def _loop(self, model, sampler: Sampler, cells, seed: int):
        def target(worker: _Worker):
            run = PlannedRun(self, worker, model, cells, seed, sampler.num_steps)
            planned.run = run
            try:
                z = sampler.run_loop(run)
            finally:
                planned.run = None
            return decode(run.components.vae, z).float().cpu(), run.unet_rows, run.max_branches

        return target

    def _execute(self, unet, requests: list[_Request], segments: _Segments) -> list[torch.Tensor]:
        """Every request's output; shared rows once, packed into calls of unet_batch rows."""
        stats = self.stats
        stats.rounds += 1
        plain: list[_Item] = []
        index: dict = {}
        where: list = []  # per request: plain indices of its items, or the position of its controlled call
        controlled: list[_Request] = []
        for r in requests:
            stats.naive_rows += sum(item.x.shape[0] for item in r.items)
            if r.control is not None:
                where.append(("control", len(controlled)))
                controlled.append(r)
                continue
            slots = []
            for item in r.items:
                if item.key is None or item.key not in index:
                    if item.key is not None:
                        index[item.key] = len(plain)
                    slots.append(len(plain))
                    plain.append(item)
                else:
                    slots.append(index[item.key])
            where.append(("plain", slots))
        plain_outputs = self._run_packed(unet, plain, controlled, segments)
        out_plain, out_controlled = plain_outputs
        responses = []
        for kind, value in where:
            if kind == "control":
                responses.append(out_controlled[value])
            else:
                responses.append(torch.cat([out_plain[s] for s in value]))
        return responses

    def _run_packed(self, unet, plain: list[_Item], controlled: list[_Request], segments: _Segments):
        cap = self.unet_batch
        if plain:
            x = torch.cat([p.x for p in plain])
            ctx = cat([p.context for p in plain])
            ts = torch.cat([p.t for p in plain])
        total, taken = (x.shape[0] if plain else 0), 0
        results_plain: list[torch.Tensor] = []
        results_controlled: list[torch.Tensor] = []
        for r in controlled:  # each controlled call keeps its rows together; plain rows fill the rest
            item = r.items[0]
            free = max(cap - item.x.shape[0], 0)
            k = min(free, total - taken)
            xs, cs, tt = [item.x], [item.context], [item.t]
            if k:
                xs.insert(0, x[taken : taken + k]), cs.insert(0, ctx[taken : taken + k]), tt.insert(0, ts[taken : taken + k])
            segments.segments = ([(0, k, None)] if k else []) + [(k, k + item.x.shape[0], r.control)]
            try:
                out = self._unet(unet, torch.cat(xs), cat(cs), torch.cat(tt))
            finally:
                segments.segments = []
            if k:
                results_plain.append(out[:k])
            results_controlled.append(out[k:])
            taken += k
        while taken < total:
            k = min(cap, total - taken)
            results_plain.append(self._unet(unet, x[taken : taken + k], ctx[taken : taken + k], ts[taken : taken + k]))
            taken += k
        outs = torch.cat(results_plain) if results_plain else None
        per_item, offset = [], 0
        for p in plain:
            n = p.x.shape[0]
            per_item.append(outs[offset : offset + n])
            offset += n
        return per_item, results_controlled

    def _unet(self, unet, x, context, t) -> torch.Tensor:
        n = x.shape[0]
        self.stats.rows += n
        self.stats.calls += 1
        if self._pad and n < self.unet_batch:  # one static shape for a compiled UNet
            pad = self.unet_batch - n
            if self._segments.segments:
                self._segments.segments = self._segments.segments + [(n, n + pad, None)]
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            context = cat([context, context[torch.full((pad,), n - 1)]])
            t = torch.cat([t, t[-1:].expand(pad)])
        self.stats.padded_rows += x.shape[0]
        return self._components.predict(x, t, context)[:n]
