"""ProFusion's fusion sampling (Zhou et al., 2023), as in the sampling study's code.

Before each mixed step (eq. 6), a fusion step at the same timestep t: a stochastic DDIM
step to t_prev guided by the concept with its own scale w_ref, followed by the forward
diffusion back to t, written in closed form. With ᾱ = ᾱ_t, ᾱ' = ᾱ_prev,

    σ² = r² · (1 − ᾱ')/(1 − ᾱ) · (1 − ᾱ/ᾱ')                     (DDIM variance, η = 1)
    ε̃  = u + w_ref (c − u)
    z  ← z − ε̃ σ² √(1 − ᾱ)/(1 − ᾱ') + σ ξ √((1 − ᾱ)(2 − 2ᾱ' − σ²))/(1 − ᾱ'),   ξ ~ N(0, I)

r = 0 leaves z unchanged (ProFusion = mixed sampling). ξ comes from each cell's own
seeded stream, so ProFusion is reproducible and paired with the other samplers.
Per step: a 2-branch UNet call (u, c) then a 3-branch one (u, c, s): 5 evaluations.
"""

from __future__ import annotations

import math

import torch

from samplers.base import CONCEPT, UNCOND, Run, Scale, scale_at
from samplers.guidance import MixedSampler
from samplers.registry import register

NOISE_STREAM = "profusion"


@register
class ProFusionSampler(MixedSampler):
    name = "profusion"

    def __init__(
        self,
        num_steps: int = 50,
        guidance_concept: Scale = 3.5,
        guidance_superclass: Scale = 3.5,
        r: float = 1.0,
        guidance_refine: Scale = 7.0,
    ):
        """``r`` is the fusion intensity in [0, 1]; ``guidance_refine`` is w_ref."""
        super().__init__(num_steps, guidance_concept, guidance_superclass)
        self.r = self.check_fraction("r", r, low_open=False, high_open=False)
        self.guidance_refine = self.check_scale("guidance_refine", guidance_refine)

    def fuse(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The fusion step: z_t -> z̃_t at the same timestep."""
        u, c = run.predict(t, [(z, UNCOND), (z, CONCEPT)])
        eps = run.to_epsilon(u + scale_at(self.guidance_refine, i) * (c - u), z, t)  # ε̃
        a_t, a_prev = run.alphas(t)
        sigma2 = self.r**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # σ² = r² Var_DDIM(t, t_prev)
        xi = run.noise(NOISE_STREAM)  # (B, C, h, w) ξ ~ N(0, I)
        drift = sigma2 * math.sqrt(1 - a_t) / (1 - a_prev)
        spread = math.sqrt(sigma2) * math.sqrt((1 - a_t) * (2 - 2 * a_prev - sigma2)) / (1 - a_prev)
        return z - drift * eps + spread * xi

    def step(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z = self.fuse(run, i, t, z)
        return super().step(run, i, t, z)  # mixed step (eq. 6) from the fused latent

    def step_key(self, i: int):
        # the key names the noise stream too: equal histories have drawn equally often
        return ("profusion", scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i), self.r,
                scale_at(self.guidance_refine, i), NOISE_STREAM)
