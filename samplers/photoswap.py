"""Photoswap (Gu et al., 2024) adapted to personalized generation, as in the sampling study.

Two trajectories start from the same x_T: the concept one (u + ω(c − u), eq. 4) and a
superclass one (u + ω(s − u), eq. 5). Both go through one 4-branch UNet call per step,
rows [u_c, c, u_s, s]. During the first steps the superclass branch s drives the concept
branch c through attention (samplers.attention.AttentionInjection):

* first t_SF steps: self-attention features, here the self-attention layer's output
  (after its output projection: what the layer adds to the residual stream);
* first t_CM steps: cross-attention maps, aligned token by token (the concept prompt's
  extra identifier token keeps its own map);
* first t_SM steps: self-attention maps (the concept branch attends with the superclass
  maps over its own values).

As in Prompt-to-Prompt and Photoswap's code, only the conditional branch is edited; the
unconditional branches run untouched. After the last injection step the superclass
trajectory has nothing left to give, so it stops and the rest is concept sampling (UNet
batch 2): with the defaults (5, 15, 20) of 50 steps that is 20·4 + 30·2 = 140 UNet
evaluations per image instead of 200.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from samplers.attention import AttentionInjection, align_tokens, attention_control
from samplers.base import CONCEPT, SUPERCLASS, UNCOND, Run, Scale, cfg_key, scale_at
from samplers.guidance import ConceptSampler
from samplers.registry import register

SOURCE, TARGET = 3, 1  # branch s drives branch c in [u_c, c, u_s, s]


@register
class PhotoswapSampler(ConceptSampler):
    name = "photoswap"

    def __init__(self, num_steps: int = 50, guidance: Scale = 7.0, t_sf: int = 5, t_cm: int = 15, t_sm: int = 20):
        super().__init__(num_steps, guidance)
        self.t_sf = self.check_step("t_sf", t_sf)
        self.t_cm = self.check_step("t_cm", t_cm)
        self.t_sm = self.check_step("t_sm", t_sm)

    @property
    def injection_steps(self) -> int:
        return max(self.t_sf, self.t_cm, self.t_sm)

    @contextmanager
    def attention(self, run: Run):
        if self.injection_steps == 0:
            yield None  # plain concept sampling: leave the processors alone
            return
        tokenizer = run.components.tokenizer
        pairs = [align_tokens(tokenizer, s, c) for s, c in zip(run.prompts[SUPERCLASS], run.prompts[CONCEPT])]
        index = torch.stack([p[0] for p in pairs])  # (B, S) superclass position of each concept token
        alpha = torch.stack([p[1] for p in pairs])  # (B, S) 1 where a concept token has a counterpart
        control = AttentionInjection(4, SOURCE, TARGET, index, alpha)
        with attention_control(run.unet, control):
            run.state["injection"] = control
            yield control

    def step(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        control: AttentionInjection | None = run.state.get("injection")
        if control is not None:
            control.set_step(features=i < self.t_sf, cross_maps=i < self.t_cm, self_maps=i < self.t_sm)
        if i >= self.injection_steps:
            return super().step(run, i, t, z)  # concept sampling, eq. 4
        z_s = run.state.get("z_superclass", z)  # the superclass trajectory starts at the same x_T
        u_c, c, u_s, s = run.predict(t, [(z, UNCOND), (z, CONCEPT), (z_s, UNCOND), (z_s, SUPERCLASS)])
        w = scale_at(self.guidance, i)
        guided = torch.cat([u_c + w * (c - u_c), u_s + w * (s - u_s)])  # eq. 4 and eq. 5, (2B, C, h, w)
        z, run.state["z_superclass"] = run.scheduler.step(guided, t, torch.cat([z, z_s])).prev_sample.chunk(2)
        return z

    def step_key(self, i: int):
        w = scale_at(self.guidance, i)
        if i >= self.injection_steps:
            return cfg_key(CONCEPT, w)  # concept sampling; the superclass trajectory is no longer used
        return ("photoswap", w, i < self.t_sf, i < self.t_cm, i < self.t_sm)  # both trajectories
