"""ProFusion's fusion sampling (Zhou et al., 2023), as in the sampling study's code.

Before each mixed step (eq. 6), a fusion step at the same timestep t: a stochastic DDIM
step to t_prev guided by the concept with its own scale w_ref, followed by the forward
diffusion back to t, written in closed form. With ᾱ = ᾱ_t, ᾱ' = ᾱ_prev,

    σ² = r² · (1 − ᾱ')/(1 − ᾱ) · (1 − ᾱ/ᾱ')                     (DDIM variance, η = 1)
    ε̃  = u + w_ref (c − u)
    z  ← z − ε̃ σ² √(1 − ᾱ)/(1 − ᾱ') + σ ξ √((1 − ᾱ)(2 − 2ᾱ' − σ²))/(1 − ᾱ'),   ξ ~ N(0, I)

r = 0 leaves z unchanged (ProFusion = mixed sampling). ``refine_steps`` fusion steps run
before each mixed step (the official code's ``refine_step``; 1 in the study's runs).

ξ: by default from each cell's own seeded stream, so ProFusion is reproducible, paired
with the other samplers and independent of batching. ``refine_seed`` (an integer) draws
it as the study's inference script does instead: one generator per prompt template,
seeded with the sum of the template's character codes (written with ``{0}``, as the
script's templates are) + seed + refine_seed, one draw of shape
(refine_steps, num_steps, refine_images, C, h, w) per template, image k taking slice
k (the script draws on the GPU's generator, so its numbers differ; the layout and the
seeding are the same). Per step: refine_steps 2-branch UNet calls (u, c) then a 3-branch
one (u, c, s): 2·refine_steps + 3 evaluations.
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
        refine_steps: int = 1,
        refine_seed: int | None = None,
        refine_images: int = 10,
    ):
        """``r`` is the fusion intensity in [0, 1]; ``guidance_refine`` is w_ref; ``refine_steps``
        fusion steps per denoising step; ``refine_seed`` None (each image's own noise stream)
        or the official script's refine seed, with ``refine_images`` images per prompt."""
        super().__init__(num_steps, guidance_concept, guidance_superclass)
        self.r = self.check_fraction("r", r, low_open=False, high_open=False)
        self.guidance_refine = self.check_scale("guidance_refine", guidance_refine)
        for name, value, low in (("refine_steps", refine_steps, 0), ("refine_images", refine_images, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.name}: {name}={value!r} must be an integer >= {low}")
        if refine_seed is not None and (isinstance(refine_seed, bool) or not isinstance(refine_seed, int)):
            raise ValueError(f"{self.name}: refine_seed={refine_seed!r} must be an integer or null (per-image noise)")
        self.refine_steps, self.refine_seed, self.refine_images = refine_steps, refine_seed, refine_images

    def refine_noise(self, run: Run, i: int, k: int) -> torch.Tensor:
        """(B, C, h, w): ξ of fusion step k at denoising step i."""
        if self.refine_seed is None:
            return run.noise(NOISE_STREAM)  # each cell's own stream, drawn in order
        cache = run.state.setdefault("refine_noise", {})
        rows = []
        for template, index in run.cells:
            if index >= self.refine_images:
                raise ValueError(
                    f"{self.name}: image index {index} with refine_seed set needs refine_images > {index} "
                    f"(the official script draws refine noise for refine_images images per prompt)"
                )
            if template not in cache:
                prompt_seed = sum(ord(ch) for ch in template.replace("{}", "{0}")) + run.seed + self.refine_seed
                gen = torch.Generator("cpu").manual_seed(prompt_seed)
                shape = (self.refine_steps, self.num_steps, self.refine_images, *run.latent_shape)
                cache[template] = torch.randn(shape, generator=gen)
            rows.append(cache[template][k, i, index])
        return torch.stack(rows).to(run.device, run.dtype)

    def fuse(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor, k: int = 0) -> torch.Tensor:
        """Fusion step k: z_t -> z̃_t at the same timestep."""
        u, c = run.predict(t, [(z, UNCOND), (z, CONCEPT)])
        eps = run.to_epsilon(u + scale_at(self.guidance_refine, i) * (c - u), z, t)  # ε̃
        a_t, a_prev = run.alphas(t)
        sigma2 = self.r**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # σ² = r² Var_DDIM(t, t_prev)
        xi = self.refine_noise(run, i, k)  # (B, C, h, w) ξ ~ N(0, I)
        drift = sigma2 * math.sqrt(1 - a_t) / (1 - a_prev)
        spread = math.sqrt(sigma2) * math.sqrt((1 - a_t) * (2 - 2 * a_prev - sigma2)) / (1 - a_prev)
        return z - drift * eps + spread * xi

    def step(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for k in range(self.refine_steps):
            z = self.fuse(run, i, t, z, k)
        return super().step(run, i, t, z)  # mixed step (eq. 6) from the fused latent

    def step_key(self, i: int):
        # the key names the noise too: equal histories have drawn equally often from the same source
        noise = NOISE_STREAM if self.refine_seed is None else ("prompt", self.refine_seed, self.refine_images)
        return ("profusion", scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i), self.r,
                scale_at(self.guidance_refine, i), self.refine_steps, noise)
