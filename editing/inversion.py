"""DDIM inversion (HiFi Tuner eq. 3) and null-text optimization (eq. 4, Mokady et al.).

Notation: a DDIM schedule of N steps has timesteps t_0 > t_1 > ... > t_{N-1} (diffusers'
``scheduler.timesteps``). A *trajectory* is the list ``[x_0*, x_1*, ..., x_N*]`` of
latents from the clean image latent (level 0) to the most noisy one (level N = x_T*):
denoising step i (timestep t_i) maps level N − i to level N − i − 1.

* :func:`ddim_step` — one deterministic DDIM update (eta 0) of a model output, written
  out (differentiable) and equal to ``DDIMScheduler.step`` for epsilon, v and sample
  prediction (no clipping, as the SD schedulers here are configured).
* :func:`invert` — eq. 3: x_{k+1} from x_k with the noise the model predicts at x_k
  under the prompt, guidance 1 (the "pivotal" inversion).
* :func:`null_text_optimization` — eq. 4: per step, the unconditional embedding φ_t is
  optimised K Adam steps so the guided (ω) step from the current latent lands on the
  inverted trajectory; then the step is taken with the optimised φ_t. Returns the
  per-step φ_t (the pivot for editing).

Everything runs on Stable Diffusion layouts (SD 1.x/2.x, MiniWorld): the conditioning is
a plain (B, L, D) tensor whose unconditional rows can be optimised. SD-XL and PixArt-α
raise a clear error (:func:`check_editable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from components.errors import UserError


def check_editable(model) -> None:
    """Inversion-based editing is built for SD-layout backbones only."""
    name = getattr(model.components.backbone, "name", "sd")
    if name != "sd":
        raise UserError(
            f"inversion, null-text optimization and the HiFi Tuner generation algorithms are built for Stable Diffusion "
            f"1.x/2.x layouts (and the MiniWorld model), not {name} models",
            fix="use an SD 1.x/2.x base model (its conditioning is one text-encoder output whose null-text rows are "
                "optimised); SD-XL's pooled embedding and PixArt-α's T5 mask are not handled by these algorithms yet",
        )


class Schedule:
    """The DDIM schedule of N steps of a model, with ᾱ lookups."""

    def __init__(self, components, num_steps: int, device=None):
        self.scheduler = components.ddim_scheduler()
        self.scheduler.set_timesteps(num_steps, device=device)
        self.timesteps = self.scheduler.timesteps  # (N,), noisiest first
        self.num_steps = num_steps
        self.prediction_type = self.scheduler.config.prediction_type
        self._stride = self.scheduler.config.num_train_timesteps // num_steps

    def alpha(self, t: int) -> float:
        """ᾱ at a training timestep; below 0 the scheduler's final ᾱ (the clean level)."""
        sched = self.scheduler
        return float(sched.alphas_cumprod[t]) if t >= 0 else float(sched.final_alpha_cumprod)

    def alphas(self, i: int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_prev) of denoising step i."""
        t = int(self.timesteps[i])
        return self.alpha(t), self.alpha(t - self._stride)


def split_output(out: torch.Tensor, x: torch.Tensor, a_t: float, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, x̂_0) implied by a model output at latent x with ᾱ_t."""
    s, r = math.sqrt(a_t), math.sqrt(1 - a_t)
    if prediction_type == "epsilon":
        return out, (x - r * out) / s
    if prediction_type == "v_prediction":  # v = s·ε − r·x0
        return s * out + r * x, s * x - r * out
    if prediction_type == "sample":
        return (x - s * out) / r, out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_step(schedule: Schedule, i: int, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x_{t_i} -> x_{t_{i+1}}: the deterministic DDIM update of a (guided) model output."""
    a_t, a_prev = schedule.alphas(i)
    eps, x0 = split_output(out, x, a_t, schedule.prediction_type)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def guided(u: torch.Tensor, c: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, eq. 1: u + ω(c − u)."""
    return u + guidance * (c - u)


@torch.no_grad()
def encode_images(components, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> x_0 latents (the VAE posterior mean × scaling)."""
    from components.pixels import encode

    return encode(components.vae, images).to(components.unet.dtype)


class Denoiser:
    """The model's denoiser at one DDIM schedule; counts UNet rows (cost reports)."""

    def __init__(self, model, num_steps: int):
        check_editable(model)
        self.model, self.components = model, model.components
        self.unet = self.components.unet
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.schedule = Schedule(self.components, num_steps, self.device)
        self.rows = 0  # UNet rows evaluated
        self.optimizer_steps = 0

    def timestep(self, i: int) -> int:
        return int(self.schedule.timesteps[i])

    def encode(self, prompts: Sequence[str], i: int | None = None) -> torch.Tensor:
        """Conditionings of written prompts at step i (step-wise models use c_s^t)."""
        t = None if i is None else self.timestep(i)
        cond = self.model.encode_prompts(list(prompts), timestep=t if self.model.timestep_dependent else None)
        return getattr(cond, "hidden_states", cond).to(self.device, self.dtype)

    def __call__(self, x: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.components.predict(x, torch.tensor(t, device=self.device), cond)


@torch.no_grad()
def invert(denoiser: Denoiser, x0: torch.Tensor, prompts: Sequence[str] | torch.Tensor,
           on_step: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Eq. 3, the pivotal DDIM inversion at guidance 1: ``[x_0*, ..., x_N*]``.

    At each level k the model predicts the noise at x_k* (timestep t_{N-1-k}, the level it
    moves to, as in null-text inversion's reference code); x̂_0 is read at the current
    level and re-noised to the next one."""
    schedule = denoiser.schedule
    n = schedule.num_steps
    traj = [x0]
    x = x0
    for k in range(n):
        i = n - 1 - k  # the denoising step that would undo this one
        t = denoiser.timestep(i)
        cond = prompts if torch.is_tensor(prompts) else denoiser.encode(prompts, i)
        out = denoiser(x, t, cond)
        a_next, a_cur = schedule.alphas(i)  # ᾱ at t_i (the next level) and at the level of x
        eps, _ = split_output(out, x, a_next, schedule.prediction_type)
        x0_hat = (x - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur)
        x = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next) * eps
        traj.append(x)
        if on_step is not None:
            on_step(k)
    return traj


@torch.no_grad()
def denoise(denoiser: Denoiser, x_T: torch.Tensor, prompts: Sequence[str], guidance: float = 1.0,
            null: Sequence[torch.Tensor] | torch.Tensor | None = None, start: int = 0,
            control=None) -> torch.Tensor:
    """DDIM from x_T (level N − start) to x_0 under the prompts, guidance ω with the
    null-text embedding (one per step, e.g. from :func:`null_text_optimization`, or one
    for all). ``control``: an object with ``set_step(i)`` (attention replay)."""
    schedule = denoiser.schedule
    x = x_T
    uncond = denoiser.encode([""] * x.shape[0]) if null is None else None
    for i in range(start, schedule.num_steps):
        t = denoiser.timestep(i)
        cond = denoiser.encode(prompts, i)
        if control is not None:
            control.set_step(i)
        if guidance == 1.0:
            out = denoiser(x, t, cond)
        else:
            u_emb = uncond if null is None else (null[i] if isinstance(null, (list, tuple)) else null)
            u_emb = u_emb.expand(x.shape[0], -1, -1) if u_emb.shape[0] == 1 else u_emb
            u, c = denoiser(torch.cat([x, x]), t, torch.cat([u_emb, cond])).chunk(2)
            out = guided(u, c, guidance)
        x = ddim_step(schedule, i, out, x)
    return x


@dataclass
class NullTextResult:
    null: list[torch.Tensor]  # per step i: φ_{t_i}, (B, L, D)
    losses: list[float] = field(default_factory=list)  # the last inner loss of each step
    latents: list[torch.Tensor] = field(default_factory=list)  # the guided reconstruction, per level


def null_text_optimization(denoiser: Denoiser, trajectory: Sequence[torch.Tensor], prompts: Sequence[str],
                           guidance: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
                           early_stop: float = 1e-5, record=None,
                           on_step: Callable[[int], None] | None = None) -> NullTextResult:
    """Eq. 4: per DDIM step, φ_t minimises ‖x*_{t−1} − F(x_t, c, φ_t)‖² (mean over elements).

    Defaults from Mokady et al.'s reference code: K = 10 Adam steps per timestep with
    lr 1e-2·(1 − i/100), stopping early once the loss is below ``early_stop`` + 2e-5·i;
    φ starts from the null-text embedding and each step starts from the previous φ_t.
    ``record``: an attention store (editing.prompt_to_prompt) that captures the source
    prompt's cross-attention at each step (the A^(t) of HiFi Tuner's Algorithm 3); it is
    active only during the conditional prediction at x_t, which the optimisation does
    not change.
    """
    schedule = denoiser.schedule
    n = schedule.num_steps
    if len(trajectory) != n + 1:
        raise ValueError(f"a trajectory of {n} steps has {n + 1} levels, got {len(trajectory)}")
    b = trajectory[0].shape[0]
    phi = denoiser.encode([""] * b).detach()
    x = trajectory[n]
    result = NullTextResult([])
    for i in range(n):
        t = denoiser.timestep(i)
        cond = denoiser.encode(prompts, i).detach()
        with torch.no_grad():
            if record is not None:
                record.start(i)
            c = denoiser(x, t, cond)
            if record is not None:
                record.stop()
        target = trajectory[n - i - 1]
        phi = phi.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([phi], lr=lr * (1.0 - i / 100.0))
        loss_value = float("nan")
        for _ in range(inner_steps):
            with torch.enable_grad():
                u = denoiser(x, t, phi)
                x_prev = ddim_step(schedule, i, guided(u, c, guidance), x)
                loss = F.mse_loss(x_prev.float(), target.float())
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            denoiser.optimizer_steps += 1
            loss_value = loss.item()
            if loss_value < early_stop + 2e-5 * i:
                break
        phi = phi.detach()
        result.null.append(phi)
        result.losses.append(loss_value)
        with torch.no_grad():
            u = denoiser(x, t, phi)
            x = ddim_step(schedule, i, guided(u, c, guidance), x)
        result.latents.append(x)
        if on_step is not None:
            on_step(i)
    return result


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1]; ``mask`` (B, 1, H, W) bool: only those pixels."""
    err = (a.float() - b.float()).pow(2)
    if mask is not None:
        m = mask.expand_as(err).float()
        mse = float((err.detach() * m).sum() / m.sum().clamp_min(1))
    else:
        mse = float(err.detach().mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))
