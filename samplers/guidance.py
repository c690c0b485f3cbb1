"""The strategies that only combine noise predictions: eqs. 4-8 of the sampling study.

u, c, s are the UNet predictions for the empty, concept and superclass prompts at z_t;
step i counts from 0 at the noisiest step. Each step evaluates only the branches its
formula uses, in one batched UNet call.
"""

from __future__ import annotations

import torch

from samplers.base import CONCEPT, SUPERCLASS, UNCOND, Interval, Run, Sampler, Scale, cfg_key, guided, mixed_key, scale_at
from samplers.registry import register


@register
class ConceptSampler(Sampler):
    """Sampling with the concept prompt, eq. 4: u + ω(c − u). UNet batch 2; 1 where ω = 1.

    ``guidance_interval: [start, stop]`` guides only the steps start <= i < stop and samples
    the others with c alone (ω = 1, half the UNet work), as Kynkäänniemi et al. (2024) limit
    guidance to an interval of noise levels; in MiniWorld, guidance at the last, least noisy
    steps is what bleaches light bodies under dark marks (README)."""

    name = "concept"

    def __init__(self, num_steps: int = 50, guidance: Scale = 7.0, guidance_interval: Interval = None):
        super().__init__(num_steps)
        self.guidance = self.check_scale("guidance", guidance)
        self.guidance_interval = self.check_interval("guidance_interval", guidance_interval)

    def guide(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return guided(run, t, z, CONCEPT, scale_at(self.guidance, i, self.guidance_interval))  # eq. 4

    def step_key(self, i: int):
        return cfg_key(CONCEPT, scale_at(self.guidance, i, self.guidance_interval))


@register
class SuperclassSampler(Sampler):
    """Sampling with the superclass prompt, eq. 5: u + ω(s − u). UNet batch 2; 1 where ω = 1.
    ``guidance_interval`` as the concept sampler's."""

    name = "superclass"

    def __init__(self, num_steps: int = 50, guidance: Scale = 7.0, guidance_interval: Interval = None):
        super().__init__(num_steps)
        self.guidance = self.check_scale("guidance", guidance)
        self.guidance_interval = self.check_interval("guidance_interval", guidance_interval)

    def guide(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return guided(run, t, z, SUPERCLASS, scale_at(self.guidance, i, self.guidance_interval))  # eq. 5

    def step_key(self, i: int):
        return cfg_key(SUPERCLASS, scale_at(self.guidance, i, self.guidance_interval))


@register
class MixedSampler(Sampler):
    """Mixed sampling, eq. 6: u + ω_s(s − u) + ω_c(c − u). UNet batch 3."""

    name = "mixed"

    def __init__(self, num_steps: int = 50, guidance_concept: Scale = 3.5, guidance_superclass: Scale = 3.5):
        super().__init__(num_steps)
        self.guidance_concept = self.check_scale("guidance_concept", guidance_concept)
        self.guidance_superclass = self.check_scale("guidance_superclass", guidance_superclass)

    def guide(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u, c, s = run.predict(t, [(z, UNCOND), (z, CONCEPT), (z, SUPERCLASS)])
        w_c, w_s = scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i)
        return u + w_s * (s - u) + w_c * (c - u)  # eq. 6

    def step_key(self, i: int):
        return mixed_key(scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i))


@register
class SwitchingSampler(Sampler):
    """Switching sampling, eq. 7: the superclass for the first t_sw steps, then the
    concept, both with guidance ω. UNet batch 2; 1 where ω = 1. ``guidance_interval`` as
    the concept sampler's."""

    name = "switching"

    def __init__(self, num_steps: int = 50, guidance: Scale = 7.0, t_sw: int = 7, guidance_interval: Interval = None):
        super().__init__(num_steps)
        self.guidance = self.check_scale("guidance", guidance)
        self.t_sw = self.check_step("t_sw", t_sw)
        self.guidance_interval = self.check_interval("guidance_interval", guidance_interval)

    def guide(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        kind = SUPERCLASS if i < self.t_sw else CONCEPT  # eq. 7: x = s while i < t_sw, else c
        return guided(run, t, z, kind, scale_at(self.guidance, i, self.guidance_interval))

    def step_key(self, i: int):
        return cfg_key(SUPERCLASS if i < self.t_sw else CONCEPT, scale_at(self.guidance, i, self.guidance_interval))


@register
class MultiStageSampler(Sampler):
    """Multi-stage sampling, eq. 8: u + (ω_s + ω_c)(s − u) for the first t_sw steps, then
    mixed (eq. 6). The paper prints the two cases the other way round; its text ("a
    greater influence of the superclass") and the official code put the superclass
    first, as here. UNet batch 2 for the first t_sw steps, then 3."""

    name = "multistage"

    def __init__(
        self, num_steps: int = 50, guidance_concept: Scale = 4.0, guidance_superclass: Scale = 3.0, t_sw: int = 10
    ):
        super().__init__(num_steps)
        self.guidance_concept = self.check_scale("guidance_concept", guidance_concept)
        self.guidance_superclass = self.check_scale("guidance_superclass", guidance_superclass)
        self.t_sw = self.check_step("t_sw", t_sw)

    def guide(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w_c, w_s = scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i)
        if i < self.t_sw:
            u, s = run.predict(t, [(z, UNCOND), (z, SUPERCLASS)])
            return u + (w_s + w_c) * (s - u)  # eq. 8, first t_sw steps
        u, c, s = run.predict(t, [(z, UNCOND), (z, CONCEPT), (z, SUPERCLASS)])
        return u + w_s * (s - u) + w_c * (c - u)  # eq. 8, then eq. 6

    def step_key(self, i: int):
        w_c, w_s = scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i)
        return cfg_key(SUPERCLASS, w_s + w_c) if i < self.t_sw else mixed_key(w_c, w_s)
