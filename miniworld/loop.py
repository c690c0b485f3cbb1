"""The one training loop of MiniWorld's small models (the VAE, the judge, the CLIP- and
DINO-like encoders): AdamW, a linear warm-up times a cosine decay to 0 over ``steps``,
one loss per step, a line of progress every ``log_every`` steps. Each model supplies
only its step: draw a batch, return the loss (and what to print beside it).

The text-to-image model is trained through Lightning instead (:mod:`miniworld.pretrain`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch


def cosine_with_warmup(steps: int, warmup: int) -> Callable[[int], float]:
    """LR factor at step s: min(1, (s + 1) / warmup) · ½(1 + cos(π · min(s, steps) / steps));
    ``warmup=0``: the cosine alone."""
    if steps < 1:
        raise ValueError(f"a MiniWorld training run needs steps >= 1 (got {steps})")

    def factor(s: int) -> float:
        ramp = min(1, (s + 1) / warmup) if warmup else 1
        return ramp * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    return factor


def train(name: str, parameters: Iterable[torch.nn.Parameter], step: Callable[[int], dict[str, torch.Tensor]],
          steps: int, lr: float, weight_decay: float, warmup: int = 100, log_every: int = 200,
          formats: dict[str, str] | None = None) -> list[float]:
    """Run ``steps`` optimizer steps of ``step(i) -> {"loss": tensor, ...}``; returns the losses.

    ``formats``: the values printed every ``log_every`` steps (and at the last), name ->
    format spec (default: the loss, 3 decimals)."""
    formats = formats or {"loss": ".3f"}
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, warmup))
    losses, t0 = [], time.time()
    for i in range(steps):
        out = step(i)
        loss = out["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i % log_every == 0 or i == steps - 1:
            shown = " ".join(f"{k} {out[k].item():{f}}" for k, f in formats.items())
            print(f"{name} step {i} {shown} ({time.time() - t0:.0f}s)", flush=True)
    return losses
