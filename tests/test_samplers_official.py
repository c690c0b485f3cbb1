"""The official-code variants of the samplers (issue 13) against reference loops written
here, on the tiny preset: a plain DDIM loop over the raw UNet, forward hooks and a
hand-written attention processor, nothing of samplers/ but the per-cell x_T."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from components.loader import load_components
from components.personalized import BaseModel
from samplers import build_sampler
from samplers.base import Run
from samplers.seeding import initial_latents

CELLS = [("a {} on the beach", 0), ("a red {}", 1)]
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return BaseModel(load_components("tiny"), superclass="dog")


@torch.no_grad()
def project_latents(sampler, model, cells=CELLS, seed=0) -> torch.Tensor:
    """z_0 of the project's loop (before decoding)."""
    return sampler.run_loop(Run(model, cells, seed, sampler.num_steps)).float()


class Reference:
    """Everything a hand-written loop needs: prompts, embeddings, x_T, a DDIM scheduler."""

    @torch.no_grad()
    def __init__(self, model, cells=CELLS, steps=STEPS, seed=0):
        c = model.components
        self.unet, self.tok, self.te, self.cells = c.unet, c.tokenizer, c.text_encoder, cells
        self.sched = DDIMScheduler.from_config(c.scheduler.config)
        self.sched.set_timesteps(steps)
        self.concept = [" ".join(t.replace("{}", "sks dog").split()) for t, _ in cells]
        self.superclass = [" ".join(t.replace("{}", "dog").split()) for t, _ in cells]
        self.u, self.c, self.s = self.encode([""] * len(cells)), self.encode(self.concept), self.encode(self.superclass)
        shape = (c.unet.config.in_channels, c.unet.config.sample_size, c.unet.config.sample_size)
        self.x_T = torch.stack([initial_latents(t, i, seed, shape) for t, i in cells]) * self.sched.init_noise_sigma

    def ids(self, prompts):
        return self.tok(prompts, padding="max_length", max_length=self.tok.model_max_length,
                        truncation=True, return_tensors="pt").input_ids

    def encode(self, prompts):
        return self.te(self.ids(prompts))[0]

    def eps(self, x, t, *contexts):
        """One UNet call on len(contexts) copies of x (or a list of latents), chunks back."""
        xs = x if isinstance(x, list) else [x] * len(contexts)
        out = self.unet(torch.cat(xs), t, encoder_hidden_states=torch.cat(contexts)).sample
        return out.chunk(len(contexts))

    def alphas(self, t):
        prev = int(t) - self.sched.config.num_train_timesteps // self.sched.num_inference_steps
        a = float(self.sched.alphas_cumprod[int(t)])
        return a, float(self.sched.alphas_cumprod[prev]) if prev >= 0 else float(self.sched.final_alpha_cumprod)


@pytest.fixture(scope="module")
def ref_factory(model):
    return lambda cells=CELLS, steps=STEPS, seed=0: Reference(model, cells, steps, seed)


def word_position(tok, prompt: str, word: str) -> int:
    ids = tok(prompt).input_ids
    [w] = tok(word, add_special_tokens=False).input_ids
    return ids.index(w)


# --------------------------------------------------------------------------- masked


@torch.no_grad()
def masked_reference(ref: Reference, mask_from: str, t_sw=1, q=0.7, w_c=3.5, w_s=3.5, w0=(0.0, 7.0)):
    """Masked sampling as the study's code runs it: to_q/to_k outputs of every cross-attention
    layer kept by forward hooks, the map of one branch at one token, heads and layers averaged."""
    saved, handles = {}, []
    for name, module in ref.unet.named_modules():
        if name.endswith("attn2"):
            for part in ("to_q", "to_k"):
                handles.append(getattr(module, part).register_forward_hook(
                    lambda m, a, out, key=(name, part): saved.__setitem__(key, out)))
    branch = {"concept": 1, "superclass": 2}[mask_from]
    prompts = ref.concept if mask_from == "concept" else ref.superclass
    word = "sks" if mask_from == "concept" else "dog"
    positions = [word_position(ref.tok, p, word) for p in prompts]
    b, size = len(ref.cells), ref.x_T.shape[-1]
    z = ref.x_T
    try:
        for i, t in enumerate(ref.sched.timesteps):
            saved.clear()
            u, c, s = ref.eps(z, t, ref.u, ref.c, ref.s)
            maps = []
            for name, module in ref.unet.named_modules():
                if not name.endswith("attn2"):
                    continue
                q_, k_ = saved[(name, "to_q")], saved[(name, "to_k")]
                h = module.heads
                qh = q_.view(q_.shape[0], q_.shape[1], h, -1).transpose(1, 2)[branch * b:(branch + 1) * b]
                kh = k_.view(k_.shape[0], k_.shape[1], h, -1).transpose(1, 2)[branch * b:(branch + 1) * b]
                probs = (qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])).softmax(-1).mean(1)  # (B, P, S)
                side = int(math.sqrt(probs.shape[1]))
                m = torch.stack([probs[j, :, positions[j]] for j in range(b)]).view(b, 1, side, side)
                maps.append(F.interpolate(m, size=(size, size), mode="bilinear"))
            amap = torch.stack(maps).mean(0)  # (B, 1, h, w)
            if i < t_sw:
                g = u + w0[0] * (c - u) + w0[1] * (s - u)
            else:
                mask = amap > torch.quantile(amap.flatten(1), q, dim=1)[:, None, None, None]
                g = torch.where(mask, u + w_c * (c - u) + w_s * (s - u), u + (w_c + w_s) * (s - u))
            z = ref.sched.step(g, t, z).prev_sample
    finally:
        for hnd in handles:
            hnd.remove()
    return z


@pytest.mark.parametrize("mask_from", ["concept", "superclass"])
def test_masked_mask_sources_match_the_reference(model, ref_factory, mask_from):
    sampler = build_sampler("masked", num_steps=STEPS, t_sw=1, mask_from=mask_from)
    ours = project_latents(sampler, model)
    ref = masked_reference(ref_factory(), mask_from)
    assert (ours - ref).abs().max() <= 5e-5
    other = masked_reference(ref_factory(), {"concept": "superclass", "superclass": "concept"}[mask_from])
    assert (other - ref).abs().max() > 1e-3  # the two sources differ: the test can tell them apart


def test_masked_mask_from_is_checked():
    with pytest.raises(ValueError, match="mask_from"):
        build_sampler("masked", mask_from="identifier")


# --------------------------------------------------------------------------- ProFusion


@torch.no_grad()
def profusion_reference(ref: Reference, refine_steps, refine_seed=None, refine_images=10, seed=0,
                        r=1.0, w_ref=7.0, w_c=3.5, w_s=3.5):
    """The study's ProFusion pipeline: refine_steps fusion steps with the DDIM variance of
    the scheduler (η = r), then the mixed step; noise per image (its own generator, drawn
    in order) or the inference script's one draw per prompt."""
    from samplers.seeding import cell_seed

    steps = len(ref.sched.timesteps)
    if refine_seed is None:
        gens = [torch.Generator().manual_seed(cell_seed(t, i, seed, "profusion")) for t, i in ref.cells]
        noise = lambda k, i: torch.stack([torch.randn(ref.x_T.shape[1:], generator=g) for g in gens])  # noqa: E731
    else:
        per_prompt = {}
        for t, _ in ref.cells:
            g = torch.Generator().manual_seed(sum(ord(ch) for ch in t.replace("{}", "{0}")) + seed + refine_seed)
            per_prompt[t] = torch.randn((refine_steps, steps, refine_images, *ref.x_T.shape[1:]), generator=g)
        noise = lambda k, i: torch.stack([per_prompt[t][k, i, j] for t, j in ref.cells])  # noqa: E731
    z = ref.x_T
    for i, t in enumerate(ref.sched.timesteps):
        a_t, a_prev = ref.alphas(t)
        prev_t = int(t) - ref.sched.config.num_train_timesteps // ref.sched.num_inference_steps
        sigma = r * float(ref.sched._get_variance(int(t), prev_t)) ** 0.5
        for k in range(refine_steps):
            u, c = ref.eps(z, t, ref.u, ref.c)
            eps = u + w_ref * (c - u)
            z = (z - eps * sigma**2 * math.sqrt(1 - a_t) / (1 - a_prev)
                 + sigma * noise(k, i) * math.sqrt((1 - a_t) * (2 - 2 * a_prev - sigma**2)) / (1 - a_prev))
        u, c, s = ref.eps(z, t, ref.u, ref.c, ref.s)
        z = ref.sched.step(u + w_c * (c - u) + w_s * (s - u), t, z).prev_sample
    return z


@pytest.mark.parametrize("refine_steps, refine_seed", [(1, None), (2, None), (2, 10), (0, None)])
def test_profusion_refine_steps_and_seed_match_the_reference(model, ref_factory, refine_steps, refine_seed):
    settings = dict(refine_steps=refine_steps) if refine_seed is None else dict(
        refine_steps=refine_steps, refine_seed=refine_seed, refine_images=3)
    sampler = build_sampler("profusion", num_steps=STEPS, **settings)
    ours = project_latents(sampler, model)
    ref = profusion_reference(ref_factory(), refine_steps, refine_seed, refine_images=3)
    assert (ours - ref).abs().max() <= 5e-5
    if refine_steps == 2:  # the variants are distinguishable: one fusion step less, or the other noise
        assert (profusion_reference(ref_factory(), 1, refine_seed, refine_images=3) - ref).abs().max() > 1e-3
        other = 10 if refine_seed is None else None
        assert (profusion_reference(ref_factory(), 2, other, refine_images=3) - ref).abs().max() > 1e-3


def test_profusion_refine_settings_are_checked(model):
    for bad in (dict(refine_steps=-1), dict(refine_steps=1.5), dict(refine_seed="10"), dict(refine_images=0)):
        with pytest.raises(ValueError, match="profusion: refine_"):
            build_sampler("profusion", **bad)
    sampler = build_sampler("profusion", num_steps=2, refine_seed=10, refine_images=1)
    with pytest.raises(ValueError, match="refine_images > 1"):
        project_latents(sampler, model, cells=[("a {}", 1)])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["sampling_study", "sampling_study_official"])
def test_study_configs_expand(name):
    """Both study sweeps load and every point builds; the official one asks for the official variants."""
    from pathlib import Path

    import yaml

    from evaluation.sweep import expand_sweep

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "eval" / f"{name}.yaml").read_text())
    points = expand_sweep(cfg["sweep"], cfg.get("defaults"))
    by_sampler = {}
    for p in points:
        by_sampler.setdefault(p.sampler, []).append(p.settings)
    official = name.endswith("official")
    assert {s["mask_from"] for s in by_sampler["masked"]} == {"superclass" if official else "concept"}
    assert {s["refine_seed"] for s in by_sampler["profusion"]} == {10 if official else None}
