"""Masked sampling, eqs. 9-11 of the sampling study.

For the first t_sw steps: mixed sampling (eq. 6) with (ω⁰_c, ω⁰_s). Then, with the
concept mask M_t of the current UNet call,

    inside M:   u + ω_c(c − u) + ω_s(s − u)        (eq. 10, concept region)
    outside M:  u + (ω_c + ω_s)(s − u)             (eq. 10, context region)

M_t = map > its per-image q-quantile, where map is a cross-attention map
(softmax(QKᵀ/√d) averaged over heads, upsampled to the latent size, averaged over all
cross-attention layers) chosen by ``mask_from``:

* ``concept`` (default, the paper's text): the concept branch's map at the concept
  token(s) of the concept prompt ("sks" of "a sks dog");
* ``superclass`` (the study's official code, which produced its figures): the
  superclass branch's map at the superclass word of the superclass prompt ("dog" of
  "a dog"; the code reads branch 2 at the identifier's position, which is where the
  superclass word sits in the superclass prompt).

Larger q: a smaller concept region, more superclass influence. UNet batch 3.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from components.attention import ConceptMapStore, attention_control, concept_weights, superclass_token_weights
from samplers.base import CONCEPT, SUPERCLASS, UNCOND, Run, Sampler, Scale, mixed_key, scale_at
from samplers.registry import register

#: mask_from -> the branch (of u, c, s) whose cross-attention map makes the mask
MASK_SOURCES = {"concept": 1, "superclass": 2}


@register
class MaskedSampler(Sampler):
    name = "masked"

    def __init__(
        self,
        num_steps: int = 50,
        guidance_concept: Scale = 3.5,
        guidance_superclass: Scale = 3.5,
        t_sw: int = 3,
        guidance_concept_0: Scale = 0.0,
        guidance_superclass_0: Scale = 7.0,
        q: float = 0.7,
        mask_from: str = "concept",
    ):
        """``guidance_*_0`` are ω⁰_c, ω⁰_s of the first t_sw (mixed) steps; q the mask quantile;
        ``mask_from`` the branch whose cross-attention map makes the mask (``concept`` or
        ``superclass``)."""
        super().__init__(num_steps)
        self.guidance_concept = self.check_scale("guidance_concept", guidance_concept)
        self.guidance_superclass = self.check_scale("guidance_superclass", guidance_superclass)
        self.t_sw = self.check_step("t_sw", t_sw)
        self.guidance_concept_0 = self.check_scale("guidance_concept_0", guidance_concept_0)
        self.guidance_superclass_0 = self.check_scale("guidance_superclass_0", guidance_superclass_0)
        self.q = self.check_fraction("q", q)
        if mask_from not in MASK_SOURCES:
            raise ValueError(f"{self.name}: mask_from={mask_from!r}; choose one of {', '.join(MASK_SOURCES)}")
        self.mask_from = mask_from

    @contextmanager
    def attention(self, run: Run):
        model, templates = run.model, [t for t, _ in run.cells]
        if self.mask_from == "concept":  # the concept tokens of the concept branch (branch 1 of u, c, s)
            weights = concept_weights(model, templates)  # where the model puts its concept (HiFi Tuner: c_s rows)
        else:  # the superclass word of the superclass branch (branch 2)
            weights = superclass_token_weights(run.components.tokenizer, templates, model.superclass)
        branch = MASK_SOURCES[self.mask_from]
        store = ConceptMapStore(weights, run.latent_shape[1:], branch=branch, n_branches=3)  # (B, S) weights
        with attention_control(run.unet, store):
            run.state["maps"] = store
            yield store

    def concept_mask(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) maps -> bool mask: above each image's q-quantile (a 1 − q fraction)."""
        threshold = torch.quantile(maps.flatten(1).float(), self.q, dim=1)  # (B,)
        return maps > threshold.to(maps.dtype)[:, None, None, None]

    def guide(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        branches = [(z, UNCOND), (z, CONCEPT), (z, SUPERCLASS)]
        if i < self.t_sw:
            u, c, s = run.predict(t, branches)
            w_c, w_s = scale_at(self.guidance_concept_0, i), scale_at(self.guidance_superclass_0, i)
            return u + w_s * (s - u) + w_c * (c - u)  # eq. 11, first t_sw steps: eq. 6 with ω⁰
        store: ConceptMapStore = run.state["maps"]
        store.active = True
        try:
            u, c, s = run.predict(t, branches)
        finally:
            store.active = False
        mask = self.concept_mask(store.pop_mean())  # (B, 1, h, w) M_t
        w_c, w_s = scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i)
        inside = u + w_c * (c - u) + w_s * (s - u)  # eq. 10, inside M_t
        outside = u + (w_c + w_s) * (s - u)  # eq. 10, outside M_t
        return torch.where(mask, inside, outside)  # eq. 11, after t_sw

    def step_key(self, i: int):
        if i < self.t_sw:
            return mixed_key(scale_at(self.guidance_concept_0, i), scale_at(self.guidance_superclass_0, i))
        return ("masked", scale_at(self.guidance_concept, i), scale_at(self.guidance_superclass, i), self.q,
                self.mask_from)
