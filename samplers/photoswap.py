"""Photoswap (Gu et al., 2024) adapted to personalized generation, as in the sampling study.

Two trajectories start from the same x_T: the concept one (u + ω(c − u), eq. 4) and a
superclass one (u + ω_s(s − u), eq. 5; ω_s = ``guidance_superclass``, by default ω).
Both go through one 4-branch UNet call per step, rows [u_c, c, u_s, s]. During the
first steps the superclass branch s drives the concept branch c through attention
(components.attention.AttentionInjection):

* self-attention features, here the self-attention layer's output (after its output
  projection: what the layer adds to the residual stream);
* cross-attention maps, token by token (``token_map``);
* self-attention maps (the concept branch attends with the superclass maps over its own
  values).

By default (``windows: steps``) the three windows are the first t_SF, t_CM, t_SM steps,
only the conditional branch is edited (as the study's code and Prompt-to-Prompt do), every
layer's self-attention maps are replaced, and the cross-attention maps are aligned token
by token (the concept prompt's extra identifier keeps its own map; padding position j takes
the superclass prompt's j − 1, the same token one place earlier). Settings switch to the
behaviour of the two official codes:

* the study's code (ControlGenAI/PersonGenSampler): ``token_map: positional`` (the maps
  copied position by position, identifier included) and ``guidance_superclass``
  (its ``guidance_scale_ref``);
* Photoswap's code (eric-ai-lab/photoswap): ``windows: photoswap`` (t_sf, t_cm, t_sm are
  fractions of num_steps: features while i <= int(t_sf·N), inclusive, so step 0 always;
  cross maps while i < int(t_cm·N); self maps while i < int((t_sm + t_sf)·N), map plus
  output steps), ``features_uncond: true`` (the unconditional rows' features too),
  ``self_map_max_positions: 1024`` (self maps only in layers of at most 32² positions),
  ``token_map: photoswap`` (its global alignment, padding j → j) and ``local_blend: true``
  (after each step from int(0.2·N) on, the concept latent keeps the superclass latent
  outside the union of the superclass word's and the identifier's cross-attention masks:
  maps summed over the steps so far at 1/4 of the latent side, 3×3 max-pooled, resized,
  over ``blend_threshold`` (0.3) of their maximum).

Without LocalBlend, after the last injection step the superclass trajectory has nothing
left to give, so it stops and the rest is concept sampling (UNet batch 2): with the
defaults (5, 15, 20) of 50 steps that is 20·4 + 30·2 = 140 UNet evaluations per image
instead of 200.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from numbers import Real

import torch
import torch.nn.functional as F

from components.attention import (
    AttentionInjection,
    _layer_size,
    align_prompts,
    align_prompts_photoswap,
    attention_control,
    concept_weights,
    learned_rows,
    superclass_token_weights,
)
from samplers.base import CONCEPT, SUPERCLASS, UNCOND, Run, Scale, cfg_key, scale_at
from samplers.guidance import ConceptSampler
from samplers.registry import register

SOURCE, TARGET = 3, 1  # branch s drives branch c in [u_c, c, u_s, s]
UNCOND_SOURCE, UNCOND_TARGET = 2, 0
WINDOWS = ("steps", "photoswap")
TOKEN_MAPS = ("aligned", "positional", "photoswap")
BLEND_START = 0.2  # Photoswap's LocalBlend: start_blend (its th: blend_threshold's default 0.3)


@register
class PhotoswapSampler(ConceptSampler):
    name = "photoswap"

    def __init__(
        self,
        num_steps: int = 50,
        guidance: Scale = 7.0,
        t_sf: float = 5,
        t_cm: float = 15,
        t_sm: float = 20,
        guidance_superclass: Scale | None = None,
        windows: str = "steps",
        token_map: str = "aligned",
        features_uncond: bool = False,
        self_map_max_positions: int | None = None,
        local_blend: bool = False,
        blend_threshold: float = 0.3,
    ):
        """t_sf, t_cm, t_sm: step counts (``windows: steps``) or fractions of num_steps
        (``windows: photoswap``); ``guidance_superclass`` the superclass trajectory's scale
        (None: ``guidance``); the rest as the module docstring says."""
        super().__init__(num_steps, guidance)
        if windows not in WINDOWS:
            raise ValueError(f"{self.name}: windows={windows!r}; choose one of {', '.join(WINDOWS)}")
        self.windows = windows
        for name, value in (("t_sf", t_sf), ("t_cm", t_cm), ("t_sm", t_sm)):
            if windows == "steps":
                setattr(self, name, self.check_step(name, value))
            else:
                setattr(self, name, self.check_fraction(name, value, low_open=False, high_open=False))
        if windows == "photoswap" and self.t_sm + self.t_sf > 1:
            raise ValueError(f"{self.name}: t_sm + t_sf = {self.t_sm + self.t_sf} > 1 (the self-map window is map + output steps)")
        self.guidance_superclass = None if guidance_superclass is None else self.check_scale(
            "guidance_superclass", guidance_superclass)
        if token_map not in TOKEN_MAPS:
            raise ValueError(f"{self.name}: token_map={token_map!r}; choose one of {', '.join(TOKEN_MAPS)}")
        self.token_map = token_map
        for name, value in (("features_uncond", features_uncond), ("local_blend", local_blend)):
            if not isinstance(value, bool):
                raise ValueError(f"{self.name}: {name}={value!r} must be true or false")
        self.features_uncond, self.local_blend = features_uncond, local_blend
        if self_map_max_positions is not None and (
            isinstance(self_map_max_positions, bool) or not isinstance(self_map_max_positions, int)
            or self_map_max_positions < 1
        ):
            raise ValueError(f"{self.name}: self_map_max_positions={self_map_max_positions!r} must be a positive "
                             f"integer (Photoswap: 1024 = 32²) or null (every layer)")
        self.self_map_max_positions = self_map_max_positions
        self.blend_threshold = self.check_fraction("blend_threshold", blend_threshold)

    def flags(self, i: int) -> tuple[bool, bool, bool]:
        """(features, cross maps, self maps) replaced at step i."""
        if self.windows == "steps":
            return i < self.t_sf, i < self.t_cm, i < self.t_sm
        n = self.num_steps
        return i <= int(self.t_sf * n), i < int(self.t_cm * n), i < int((self.t_sm + self.t_sf) * n)

    @property
    def injection_steps(self) -> int:
        """Steps that need the superclass trajectory (all of them with LocalBlend)."""
        if self.local_blend:
            return self.num_steps
        return max((i + 1 for i in range(self.num_steps) if any(self.flags(i))), default=0)

    @contextmanager
    def attention(self, run: Run):
        if self.injection_steps == 0:
            yield None  # plain concept sampling: leave the processors alone
            return
        tokenizer = run.components.tokenizer
        pairs = [(s, c) for s, c in zip(run.prompts[SUPERCLASS], run.prompts[CONCEPT])]
        if self.token_map == "positional":  # the study's code: position j takes position j
            length = tokenizer.model_max_length
            index, alpha = torch.arange(length).expand(run.batch, length).clone(), torch.ones(run.batch, length)
        else:
            if self.token_map == "aligned":  # rows as the model conditions on them (HiFi Tuner: no placeholder)
                maps = [align_prompts(run.model, s, c) for s, c in pairs]
            else:
                maps = [align_prompts_photoswap(run.model, s, c) for s, c in pairs]
            index = torch.stack([m[0] for m in maps])  # (B, S) superclass position of each concept token
            alpha = torch.stack([m[1] for m in maps])  # (B, S) 1 where a concept token has a counterpart
        for b, (_, c) in enumerate(pairs):
            alpha[b, learned_rows(run.model, c)] = 0.0  # learned rows (HiFi Tuner's c_s) keep their own maps
        store = None
        if self.local_blend:
            templates = [t for t, _ in run.cells]
            model = run.model
            blend = BlendStore(
                self.blend_threshold,
                superclass_token_weights(tokenizer, templates, model.superclass),
                concept_weights(model, templates),
            )
            run.state["blend"] = store = blend
        control = AttentionInjection(
            4, SOURCE, TARGET, index, alpha,
            uncond=(UNCOND_SOURCE, UNCOND_TARGET) if self.features_uncond else None,
            self_map_max_positions=self.self_map_max_positions, store=store,
        )
        with attention_control(run.unet, control):
            run.state["injection"] = control
            yield control

    def step(self, run: Run, i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        control: AttentionInjection | None = run.state.get("injection")
        if control is not None:
            control.set_step(*self.flags(i))
        if i >= self.injection_steps:
            return super().step(run, i, t, z)  # concept sampling, eq. 4
        z_s = run.state.get("z_superclass", z)  # the superclass trajectory starts at the same x_T
        u_c, c, u_s, s = run.predict(t, [(z, UNCOND), (z, CONCEPT), (z_s, UNCOND), (z_s, SUPERCLASS)])
        w = scale_at(self.guidance, i)
        w_s = w if self.guidance_superclass is None else scale_at(self.guidance_superclass, i)
        guided = torch.cat([u_c + w * (c - u_c), u_s + w_s * (s - u_s)])  # eq. 4 and eq. 5, (2B, C, h, w)
        z, z_s = run.scheduler.step(guided, t, torch.cat([z, z_s])).prev_sample.chunk(2)
        if self.local_blend and i + 1 > int(BLEND_START * self.num_steps):
            mask = run.state["blend"].mask(z.shape[-2:]).to(z.dtype)  # (B, 1, h, w)
            z = z_s + mask * (z - z_s)  # Photoswap's LocalBlend: the superclass latent outside the mask
        run.state["z_superclass"] = z_s
        return z

    def step_key(self, i: int):
        w = scale_at(self.guidance, i)
        if i >= self.injection_steps:
            return cfg_key(CONCEPT, w)  # concept sampling; the superclass trajectory is no longer used
        w_s = w if self.guidance_superclass is None else scale_at(self.guidance_superclass, i)
        # both trajectories; LocalBlend's map sums are state, equal for equal key histories
        return ("photoswap", w, w_s, *self.flags(i), self.token_map, self.features_uncond,
                self.self_map_max_positions, self.local_blend and self.blend_threshold)


class BlendStore:
    """Photoswap's LocalBlend maps: per cross-attention layer size, the sum over layers and
    steps of the superclass word's map (superclass branch) and of the identifier's map
    (concept branch), heads averaged."""

    def __init__(self, threshold: float, source_weights: torch.Tensor, target_weights: torch.Tensor):
        self.threshold = threshold
        self.weights = (source_weights.float(), target_weights.float())  # (B, S) each
        self.sums: dict[int, list[torch.Tensor]] = {}  # positions -> [source (B, P), target (B, P)]

    def __call__(self, probs_source: torch.Tensor, probs_target: torch.Tensor) -> None:
        maps = [(p * w.to(p.device)[:, None, None, :]).sum(-1).mean(1) for p, w in
                zip((probs_source, probs_target), self.weights)]  # (B, P) each
        total = self.sums.get(maps[0].shape[1])
        self.sums[maps[0].shape[1]] = maps if total is None else [a + b for a, b in zip(total, maps)]

    def mask(self, latent_size) -> torch.Tensor:
        """(B, 1, h, w) bool: the union of the two maps' masks (over 0.3 of their maximum)."""
        h, w = int(latent_size[0]), int(latent_size[1])
        want = max(h * w / 16, 1.0)  # Photoswap: the 16x16 layers of a 64x64 latent
        positions = min(self.sums, key=lambda p: (abs(math.log(p / want)), -p))
        side = _layer_size(positions, (h, w))
        union = None
        for m in self.sums[positions]:
            m = F.max_pool2d(m.view(-1, 1, *side), 3, stride=1, padding=1)
            m = F.interpolate(m, size=(h, w))  # nearest, as Photoswap resizes
            m = m / m.amax((2, 3), keepdim=True)
            m = m > self.threshold
            union = m if union is None else union | m
        return union
