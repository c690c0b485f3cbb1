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


# --------------------------------------------------------------------------- the shared loop

# Snapshot of the four hand-written loops before they became miniworld.loop.train (3 steps on
# test_miniworld's 48-image render, one thread): the loss of each step, and the summed
# |trained - initial| weights. The shared loop reproduced them bit for bit (losses and every
# weight tensor, torch.equal) when it replaced them.
OLD_LOOPS = {
    "vae": ([0.41404640674591064, 0.4031311273574829, 0.49022746086120605], 5.098541524046993),
    "judge": ([9.563020706176758, 9.295269012451172, 9.352717399597168], 840.2141222599892),
    "clip": ([2.2788214683532715, 2.196465492248535, 2.186310291290283], 5.560117293213326),
    "dino": ([0.3582637906074524, 0.6283053159713745, 0.30148980021476746], 2.378026604425329),
}


def _initial(name):
    from miniworld.encoders import build_clip, build_dino
    from miniworld.judge import Judge
    from miniworld.vae import build_vae

    torch.manual_seed(0)
    return {"vae": build_vae, "judge": Judge, "clip": lambda: build_clip(32, 0)[0], "dino": lambda: build_dino(32, 0)[0]}[name]()


@pytest.mark.parametrize("name", list(OLD_LOOPS))
def test_shared_loop_reproduces_the_old_loops(name, monkeypatch, tmp_path, capsys):
    from test_miniworld import _small_rendered

    from miniworld import encoders, judge, loop, vae

    module = {"vae": vae, "judge": judge, "clip": encoders, "dino": encoders}[name]
    monkeypatch.setattr(module, "rendered", _small_rendered)
    losses = []
    monkeypatch.setattr(module, "train", lambda *a, **k: losses.extend(loop.train(*a, **k)))
    run = {"vae": lambda: vae.train_vae(tmp_path / "m", steps=3, batch_size=4),
           "judge": lambda: judge.train_judge(tmp_path / "m", steps=3, batch_size=8, vae=None),
           "clip": lambda: encoders.train_clip(tmp_path / "m", steps=3, batch_size=8),
           "dino": lambda: encoders.train_dino(tmp_path / "m", steps=3, batch_size=4)}[name]
    model = run()
    old_losses, old_delta = OLD_LOOPS[name]
    assert losses == pytest.approx(old_losses, rel=1e-5)
    init = _initial(name).state_dict()
    trained = model.state_dict()
    delta = sum(float((trained[k].double() - init[k].double()).abs().sum()) for k in trained
                if trained[k].is_floating_point() and "running" not in k)
    assert delta == pytest.approx(old_delta, rel=1e-4)
    printed = capsys.readouterr().out
    assert f"{name} step 0 " in printed and f"{name} step 2 " in printed  # the progress lines as before
    if name == "vae":
        assert "mse 0.4140 kl 0.100" in printed


def test_shared_schedule_is_the_old_lambdas():
    from miniworld.loop import cosine_with_warmup

    steps = 1500
    warm, judge = cosine_with_warmup(steps, 100), cosine_with_warmup(steps, 0)
    for s in (0, 1, 50, 99, 100, 700, 1499, 1500):
        assert warm(s) == min(1, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))  # vae, encoders
        assert judge(s) == 0.5 * (1 + math.cos(math.pi * s / steps))  # judge: no warm-up
    with pytest.raises(ValueError, match="steps >= 1"):  # was a ZeroDivisionError from inside LambdaLR
        cosine_with_warmup(0, 100)
