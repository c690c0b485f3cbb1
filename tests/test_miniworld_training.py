"""MiniWorld training building blocks against the hand-written code they replaced: diffusers'
EMAModel, compute_snr and the library LR schedules in miniworld/pretrain.py give the old
numbers (the reference functions below are the old code, verbatim in substance)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from components.loader import TINY_CONFIG
from miniworld.pretrain import lr_schedule, snr_loss_weights, weight_average


def _old_lr_factor(step: int, warm: int, total: int | None) -> float:
    """miniworld/pretrain.py's LambdaLR factor before the library schedule."""
    warm = max(1, warm)
    if step < warm:
        return (step + 1) / warm
    if total is None:
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _lrs(warm: int, total: int | None, steps: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, out = lr_schedule(opt, warm, total), []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warm,total", [(200, 6000), (10, 37), (1, 2), (5, None)])
def test_lr_schedule_matches_the_old_one_after_warmup(warm, total):
    steps = total or 50
    lrs = _lrs(warm, total, steps)
    for s in range(steps):
        if s >= warm:  # the cosine to 10% (or constant): the old numbers
            assert lrs[s] == pytest.approx(_old_lr_factor(s, warm, total), abs=1e-12), s
        else:  # the library's warmup starts at 0: one step later than the old (s + 1) / warm
            assert lrs[s] == pytest.approx(s / warm, abs=1e-12) and lrs[s] < _old_lr_factor(s, warm, total)
    if total:
        assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm))))
        assert min(lrs[warm:]) > 0.1 - 1e-12  # the floor (diffusers' own cosine would reach 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_old_formula(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type, **TINY_CONFIG["scheduler"])
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)  # the old code
    clipped = snr.clamp(max=5.0)
    old = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    new = snr_loss_weights(scheduler, t, 5.0, prediction_type)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=0)
    assert old[0] < 0.01 and old[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else float(snr[-1] / (snr[-1] + 1)))


def test_ema_matches_the_hand_written_average():
    """k updates of diffusers' EMAModel (as pretrain.py configures it) == the old lerp with
    decay min(d, (1 + k) / (10 + k)) at global step k."""
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    old = [p.detach().clone() for p in live.parameters()]
    ema = weight_average(list(live.parameters()), decay=0.7)
    for k in range(1, 31):  # k: global_step after the k-th optimizer step; the cap 0.7 holds from k = 20
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.7, (1 + k) / (10 + k))
        for p_old, p in zip(old, live.parameters()):
            p_old.lerp_(p.detach(), 1 - decay)
        ema.step(live.parameters())
        assert ema.cur_decay_value == pytest.approx(decay)
    for a, b in zip(ema.shadow_params, old):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(ema.shadow_params[0], live[0].weight)  # an average, not a copy
    # diffusers' default (update_after_step=0) would start with a copy: a different average
    plain = type(ema)(list(torch.nn.Linear(1, 1).parameters()), decay=0.9)
    assert plain.get_decay(1) == 0.0 and ema.get_decay(1) == pytest.approx(2 / 11)
