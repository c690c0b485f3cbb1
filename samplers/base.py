"""The DDIM loop shared by every sampling strategy.

A strategy is a subclass of :class:`Sampler`. At each DDIM step i (i = 0 is the noisiest
step) it picks which prompt branches go into the step's one batched UNet call and how
their noise predictions combine (:meth:`Sampler.guide`). Everything else lives here:
building the concept and superclass prompts from templates, encoding them (once, or at
every step for step-wise embeddings), the per-cell initial latents, batching, the DDIM
update (diffusers' ``DDIMScheduler``, which also handles v-prediction), decoding, and
counting the UNet work.

Notation of the paper (Sec. 3): u, c, s are the UNet predictions for the empty prompt,
the concept prompt p^C and the superclass prompt p^S at the current latent z_t, and ω
are guidance scales. A guidance scale is a number or a schedule: one value per step.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from numbers import Real
from typing import ClassVar, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from components.conditioning import Cond, cat
from components.personalized import PersonalizedModel, concept_prompt, fill, superclass_prompt
from components.pixels import decode  # noqa: F401 - samplers.base.decode
from samplers.seeding import CellNoise, initial_latents

#: A guidance scale: one number for every step, or one value per step.
Scale = Union[float, Sequence[float]]

#: Steps [start, stop) where a guidance scale applies (the rest sample at ω = 1), or None: every step.
Interval = Optional[Sequence[int]]

#: Prompt kinds of a branch: the empty prompt, the concept prompt, the superclass prompt.
UNCOND, CONCEPT, SUPERCLASS = "u", "c", "s"


def scale_at(scale: Scale, i: int, interval: Interval = None) -> float:
    """The value of a guidance scale (number or per-step schedule) at step i; outside the
    steps ``interval = [start, stop)`` it is 1: the prompt's own prediction, unguided."""
    if interval is not None and not interval[0] <= i < interval[1]:
        return 1.0
    return float(scale) if isinstance(scale, Real) else float(scale[i])


def guided(run: "Run", t: torch.Tensor, z: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """u + ω(x − u), x the prediction of the prompt ``kind`` at z (eqs. 4, 5, 7). At ω = 1 that
    is x itself: one UNet branch, no empty-prompt call (diffusers' pipelines skip it too)."""
    if scale == 1.0:
        (x,) = run.predict(t, [(z, kind)])
        return x
    u, x = run.predict(t, [(z, UNCOND), (z, kind)])
    return u + scale * (x - u)


@dataclass
class SampleOutput:
    images: torch.Tensor  # (N, 3, H, W) float32 in [0, 1] on CPU, template-major then image index
    templates: list[str]
    indices: list[int]
    cost: dict = field(default_factory=dict)  # {"unet_evals_per_image": float, "max_unet_batch": int}


class Run:
    """One batch of B cells going through the loop together.

    Holds the prompts of each kind, their embeddings (cached, or re-encoded at every
    step when the model is timestep dependent), x_T, per-cell noise streams, the DDIM
    scheduler and the UNet-work counters. Strategies call :meth:`predict` once per step
    (ProFusion twice) and keep any per-run state in ``self.state``.
    """

    def __init__(self, model: PersonalizedModel, cells: Sequence[tuple[str, int]], seed: int, num_steps: int):
        self.model, self.cells, self.seed = model, list(cells), seed
        self.components = model.components
        self.unet = self.components.unet
        self.device, self.dtype = self.unet.device, self.unet.dtype
        templates = [t for t, _ in self.cells]
        self.prompts = {
            UNCOND: [""] * len(templates),
            CONCEPT: [concept_prompt(model, t) for t in templates],
            SUPERCLASS: [superclass_prompt(model, t) for t in templates],
        }
        self.scheduler = self.components.ddim_scheduler()
        self.scheduler.set_timesteps(num_steps, device=self.device)
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        self.latent_shape = (channels, size, size) if isinstance(size, int) else (channels, *size)
        x_T = torch.stack([initial_latents(t, i, seed, self.latent_shape) for t, i in self.cells])
        self.x_T = (x_T * self.scheduler.init_noise_sigma).to(self.device, self.dtype)  # (B, C, h, w)
        self.state: dict = {}
        self.unet_rows = 0  # rows through the UNet, summed over calls
        self.max_branches = 0  # the largest UNet call, in branches (= rows per image)
        self._embeddings: dict[str, Cond] = {}  # kind -> (B, L, D) conditioning
        self._embeddings_step: int | None = None  # the step they were encoded at (step-wise models)
        self._noise: dict[str, CellNoise] = {}

    @property
    def batch(self) -> int:
        return len(self.cells)

    def embeddings(self, kind: str, t: torch.Tensor | int) -> Cond:
        """(B, L, D) conditioning of one prompt kind; re-encoded per step if the model asks."""
        step = int(t) if self.model.timestep_dependent else None
        if step != self._embeddings_step:
            self._embeddings, self._embeddings_step = {}, step  # step-wise embeddings: drop the last step's
        if kind not in self._embeddings:
            prompts = self.prompts[kind]
            unique = list(dict.fromkeys(prompts))
            encoded = self.model.encode_prompts(unique, timestep=step)  # (U, L, D)
            index = torch.tensor([unique.index(p) for p in prompts], device=encoded.device)
            self._embeddings[kind] = encoded[index].to(self.device, self.dtype)  # (B, L, D)
        return self._embeddings[kind]

    def predict(self, t: torch.Tensor, branches: Sequence[tuple[torch.Tensor, str]]) -> list[torch.Tensor]:
        """One batched UNet call over branches (latent (B, C, h, w), prompt kind).

        Rows are branch-major: branch k holds rows k·B ... (k+1)·B − 1. Attention
        controls (components.attention) rely on this layout.
        """
        x = torch.cat([z for z, _ in branches])  # (n·B, C, h, w)
        x = self.scheduler.scale_model_input(x, t)
        context = cat([self.embeddings(kind, t) for _, kind in branches])  # (n·B, L, D)
        self.unet_rows += x.shape[0]
        self.max_branches = max(self.max_branches, len(branches))
        return list(self.forward(x, t, context, branches).chunk(len(branches)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Cond, branches) -> torch.Tensor:
        """The denoiser on the rows of one :meth:`predict` call, (n·B, C, h, w) -> (n·B, C, h, w).

        The sweep planner (evaluation.planner) overrides this to share and pack the rows
        of many runs; ``branches`` tells it which rows are predictions at the run's
        current latent.
        """
        return self.components.predict(x, t, context)  # the backbone's denoiser call

    def start_step(self, i: int, key, z: torch.Tensor) -> None:
        """Called by the loop before step i with the sampler's :meth:`Sampler.step_key` and z_t."""

    def noise(self, stream: str) -> torch.Tensor:
        """(B, C, h, w): the next N(0, I) draw of each cell's own ``stream``."""
        if stream not in self._noise:
            self._noise[stream] = CellNoise(self.cells, self.seed, stream)
        return self._noise[stream].draw(self.latent_shape, self.device, self.dtype)

    def alphas(self, t: torch.Tensor | int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_prev) as DDIMScheduler.step uses them at timestep t."""
        sched = self.scheduler
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = float(sched.alphas_cumprod[int(t)])
        a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        return a_t, a_prev

    def to_epsilon(self, model_output: torch.Tensor, z: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The noise ε implied by a guided model output, whatever the prediction type."""
        a_t, _ = self.alphas(t)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) x0  ⇒  ε = √ᾱ v + √(1−ᾱ) z
            return math.sqrt(a_t) * model_output + math.sqrt(1 - a_t) * z
        if kind == "sample":
            return (z - math.sqrt(a_t) * model_output) / math.sqrt(1 - a_t)
        raise ValueError(f"Unknown prediction_type {kind!r} in the scheduler config.")


class Sampler:
    """A guidance strategy over the shared DDIM loop.

    Subclasses set ``name``, take their settings as typed keyword arguments (validated
    in ``__init__``, so bad settings fail before any work) and implement :meth:`guide`.
    Those with extra work per step (ProFusion's fusion step, Photoswap's second
    trajectory) override :meth:`step`; those that watch or edit attention override
    :meth:`attention`.
    """

    name: ClassVar[str] = ""
    #: settings added after run folders and result files were written with the samplers that
    #: take them: :meth:`settings` leaves them out at these values, so those folders still
    #: resume and their results still match (sample.py's run.json, evaluate.py's result keys)
    quiet_defaults: ClassVar[dict] = {"guidance_interval": None}

    def __init__(self, num_steps: int = 50):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"{self.name}: num_steps={num_steps!r} must be a positive integer")
        self.num_steps = num_steps

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict:
        """The constructor's arguments and their values (for manifests and tables)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        quiet = self.quiet_defaults
        return {n: _plain(getattr(self, n)) for n in names if not (n in quiet and getattr(self, n) == quiet[n])}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    def check_scale(self, name: str, value: Scale) -> Scale:
        """A guidance scale: a number >= 0, or a list of num_steps numbers >= 0."""
        if isinstance(value, Real) and not isinstance(value, bool):
            values = [float(value)]
        elif isinstance(value, Sequence) and not isinstance(value, str):
            values = list(value)
            if len(values) != self.num_steps:
                raise ValueError(
                    f"{self.name}: {name} has {len(values)} values but num_steps={self.num_steps}; "
                    f"give one number or one value per step"
                )
            if not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{self.name}: {name}={value!r} must hold numbers")
        else:
            raise ValueError(f"{self.name}: {name}={value!r} must be a number or a list of {self.num_steps} numbers")
        if any(v < 0 for v in values):
            raise ValueError(f"{self.name}: {name}={value!r} is negative; guidance scales must be >= 0")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{self.name}: {name}={value!r} is not finite")
        return float(value) if isinstance(value, Real) else [float(v) for v in values]

    def check_interval(self, name: str, value: Interval) -> list[int] | None:
        """None (every step), or [start, stop] with 0 <= start <= stop <= num_steps."""
        if value is None:
            return None
        ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok or not 0 <= value[0] <= value[1] <= self.num_steps:
            raise ValueError(
                f"{self.name}: {name}={value!r} must be [start, stop], the steps start <= i < stop that are "
                f"guided, with 0 <= start <= stop <= num_steps={self.num_steps} (e.g. [0, {self.num_steps // 2}])"
            )
        return [int(v) for v in value]

    def check_step(self, name: str, value: int) -> int:
        """A step count in 0 ... num_steps (e.g. the switching step t_sw)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.name}: {name}={value!r} must be an integer number of steps")
        if not 0 <= value <= self.num_steps:
            raise ValueError(
                f"{self.name}: {name}={value} is beyond num_steps={self.num_steps}; "
                f"choose 0 <= {name} <= {self.num_steps}"
            )
        return value

    def check_fraction(self, name: str, value: float, low_open: bool = True, high_open: bool = True) -> float:
        """A number in (0, 1), [0, 1], ... as the open flags say."""
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"{self.name}: {name}={value!r} must be a number")
        ok_low = value > 0 if low_open else value >= 0
        ok_high = value < 1 if high_open else value <= 1
        if not (ok_low and ok_high):
            span = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            cmp_low, cmp_high = ("<" if low_open else "<="), ("<" if high_open else "<=")
            raise ValueError(
                f"{self.name}: {name}={value} is outside {span}; choose 0 {cmp_low} {name} {cmp_high} 1"
            )
        return float(value)

    # ------------------------------------------------------------------ strategy hooks

    def guide(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The guided model output at step i (one batched UNet call via ``run.predict``)."""
        raise NotImplementedError

    def step(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z_t -> z_{t-1}: guidance, then the DDIM update."""
        return run.scheduler.step(self.guide(run, i, t, z), t, z).prev_sample

    def attention(self, run: Run):
        """A context manager around the whole loop of a run (attention processors)."""
        return nullcontext()

    def step_key(self, i: int):
        """What step i does, as a hashable value, or None (the default: nothing shared).

        The contract that lets a sweep share work (evaluation.planner): two runs of the
        same cells, seed and num_steps whose keys agree at steps 0 ... k−1 hold the same
        latent (and sampler state) before step k, bit for bit. So a key must name the
        formula and every value step i uses, with the same arithmetic for the same key
        (``cfg_key``, ``mixed_key``), and a sampler whose step keeps state (a second
        trajectory, a noise stream) must say so in its key. Only the class that defines
        ``step_key`` itself is trusted: a subclass that does not redefine it shares
        nothing beyond step 0's predictions.
        """
        return None

    def shared_step_key(self, i: int):
        """:meth:`step_key` if this very class defines it, else None."""
        return self.step_key(i) if "step_key" in type(self).__dict__ else None

    def run_loop(self, run: Run, on_step=None) -> torch.Tensor:
        """x_T -> z_0 of one run: every step, inside the sampler's attention context."""
        with self.attention(run):
            z = run.x_T
            for i, t in enumerate(run.scheduler.timesteps):
                run.start_step(i, self.shared_step_key(i), z)
                z = self.step(run, i, t, z)  # (B, C, h, w)
                if on_step is not None:
                    on_step(run.batch)
        return z

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def sample(
        self,
        model: PersonalizedModel,
        templates: Sequence[str],
        num_images: int = 1,
        seed: int = 0,
        batch_size: int = 8,
        progress: bool = False,
        indices: Sequence[int] | None = None,
    ) -> SampleOutput:
        """Images for every template and image index (``indices`` or 0 ... num_images − 1)."""
        if isinstance(templates, str):
            templates = [templates]
        indices = list(range(num_images)) if indices is None else [int(i) for i in indices]
        return self.sample_cells(model, [(t, i) for t in templates for i in indices], seed, batch_size, progress)

    @torch.no_grad()
    def sample_cells(
        self,
        model: PersonalizedModel,
        cells: Sequence[tuple[str, int]],
        seed: int = 0,
        batch_size: int = 8,
        progress: bool = False,
    ) -> SampleOutput:
        """Images for explicit (template, image index) cells, in the order given."""
        _check_model(model)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (images per UNet batch)")
        for template, _ in cells:
            fill(template, "x")  # fails early, naming the template, if it has no {} slot
        from components.compile import is_compiled

        static = is_compiled(model.components.unet)  # a compiled UNet: one batch shape, the last batch padded
        images, rows, max_branches = [], 0, 0
        with tqdm(total=len(cells) * self.num_steps, disable=not progress, desc=self.name, unit="img·step") as bar:
            for start in range(0, len(cells), batch_size):
                chunk = list(cells[start : start + batch_size])
                real = len(chunk)
                if static and real < batch_size:
                    chunk += [chunk[-1]] * (batch_size - real)  # copies of a cell: rows independent, dropped below
                run = Run(model, chunk, seed, self.num_steps)
                z = self.run_loop(run, on_step=lambda n: bar.update(min(n, real)))
                images.append(decode(run.components.vae, z[:real]).float().cpu())
                rows, max_branches = rows + run.unet_rows * real // run.batch, max(max_branches, run.max_branches)
        cost = {"unet_evals_per_image": rows / max(len(cells), 1), "max_unet_batch": max_branches}
        return SampleOutput(
            torch.cat(images) if images else torch.empty(0, 3, 0, 0),
            [t for t, _ in cells],
            [i for _, i in cells],
            cost,
        )


def cfg_key(kind: str, scale: float) -> tuple:
    """Step key of ``u + ω(x − u)`` with x the prediction of ``kind`` at z (eqs. 4, 5, 7, 8)."""
    return ("cfg", kind, float(scale))


def mixed_key(w_c: float, w_s: float) -> tuple:
    """Step key of ``u + ω_s(s − u) + ω_c(c − u)`` (eq. 6)."""
    return ("mixed", float(w_c), float(w_s))


def _check_model(model) -> None:
    if not isinstance(model, PersonalizedModel):
        raise TypeError(
            f"{type(model).__name__} does not implement components.personalized.PersonalizedModel "
            f"(components, superclass, timestep_dependent, concept_phrase, encode_prompts). Wrap a plain "
            f"model with components.personalized.BaseModel, or load an artifact with "
            f"lightning_modules.load_personalized."
        )


def _plain(value):
    """Settings as JSON-friendly values (tuples -> lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value

