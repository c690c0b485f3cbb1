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


# --------------------------------------------------------------------------- Photoswap


class SwapProcessor:
    """A hand-written attention processor for the reference loop: explicit softmax(QKᵀ·scale),
    rows [u_c, c, u_s, s] of b images each; ``ctl`` holds the step's flags and options."""

    def __init__(self, ctl):
        self.ctl = ctl

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctl, cross = self.ctl, encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        b = q.shape[0] // 4
        uc, c, us, s = (slice(j * b, (j + 1) * b) for j in range(4))
        if not cross and ctl.features:  # Photoswap's code: the target rows attend as the source rows
            for src, tgt in ([(s, c), (us, uc)] if ctl.opts.get("features_uncond") else [(s, c)]):
                q[tgt], k[tgt], v[tgt] = q[src], k[src], v[src]
        heads = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (N, H, P, S)
        if cross and ctl.store is not None:
            ctl.store.append((probs.shape[2], probs[s].clone(), probs[c].clone()))
        if cross and ctl.cross:
            index = ctl.index[:, None, None, :].expand_as(probs[s])
            alpha = ctl.alpha[:, None, None, :]
            probs[c] = alpha * probs[s].gather(-1, index) + (1 - alpha) * probs[c]
        if not cross and ctl.self_maps and probs.shape[2] <= ctl.opts.get("self_map_max_positions", 10**9):
            probs[c] = probs[s]
        out = (probs @ v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def token_map(ref: Reference, kind: str):
    """(index, alpha) (B, S) of each concept prompt against its superclass prompt: the
    identifier is one inserted token at position p."""
    length = ref.tok.model_max_length
    index, alpha = torch.arange(length).repeat(len(ref.cells), 1), torch.ones(len(ref.cells), length)
    if kind == "positional":
        return index, alpha
    for row, prompt in enumerate(ref.concept):
        p = word_position(ref.tok, prompt, "sks")
        real = len(ref.tok(prompt).input_ids)  # tokens before the padding
        alpha[row, p] = 0.0
        stop = length if kind == "aligned" else real  # aligned: padding shifts too; photoswap: j -> j there
        index[row, p + 1 : stop] -= 1
    return index, alpha


@torch.no_grad()
def photoswap_reference(ref: Reference, t_sf, t_cm, t_sm, w=7.0, w_s=None, windows="steps", blend_threshold=0.3,
                        **opts):
    from types import SimpleNamespace

    n = len(ref.sched.timesteps)
    index, alpha = token_map(ref, opts.get("token_map", "aligned"))
    ctl = SimpleNamespace(opts=opts, index=index, alpha=alpha, store=[] if opts.get("local_blend") else None)
    unet = ref.unet
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: SwapProcessor(ctl) for name in original})
    b = len(ref.cells)
    weights = []  # LocalBlend words: "dog" in the superclass prompts, "sks" in the concept prompts
    for prompts, word in ((ref.superclass, "dog"), (ref.concept, "sks")):
        wt = torch.zeros(b, ref.tok.model_max_length)
        for row, prompt in enumerate(prompts):
            wt[row, word_position(ref.tok, prompt, word)] = 1.0
        weights.append(wt)
    sums = [0.0, 0.0]
    try:
        z = z_s = ref.x_T
        for i, t in enumerate(ref.sched.timesteps):
            if windows == "steps":
                ctl.features, ctl.cross, ctl.self_maps = i < t_sf, i < t_cm, i < t_sm
            else:
                ctl.features, ctl.cross, ctl.self_maps = i <= int(t_sf * n), i < int(t_cm * n), i < int((t_sm + t_sf) * n)
            u_c, c, u_s, s = ref.eps([z, z, z_s, z_s], t, ref.u, ref.c, ref.u, ref.s)
            z = ref.sched.step(u_c + w * (c - u_c), t, z).prev_sample
            z_s = ref.sched.step(u_s + (w if w_s is None else w_s) * (s - u_s), t, z_s).prev_sample
            if ctl.store is not None:
                for positions, p_s, p_c in ctl.store:
                    if positions == 16:  # the 4x4 layers: 1/4 of the 8x8 latent rounds to them
                        sums[0] = sums[0] + (p_s * weights[0][:, None, None, :]).sum(-1).mean(1)
                        sums[1] = sums[1] + (p_c * weights[1][:, None, None, :]).sum(-1).mean(1)
                ctl.store.clear()
                if i + 1 > int(0.2 * n):
                    masks = []
                    for m in sums:
                        m = F.max_pool2d(m.view(b, 1, 4, 4), 3, 1, 1)
                        m = F.interpolate(m, size=z.shape[-2:])
                        masks.append(m / m.amax((2, 3), keepdim=True) > blend_threshold)
                    mask = (masks[0] | masks[1]).float()
                    z = z_s + mask * (z - z_s)
    finally:
        unet.set_attn_processor(original)
    return z


PHOTOSWAP_VARIANTS = {
    "project default": (4, dict(t_sf=1, t_cm=2, t_sm=3)),
    "study code (positional maps, guidance_superclass)": (4, dict(t_sf=1, t_cm=2, t_sm=3, token_map="positional",
                                                                  guidance_superclass=5.0)),
    "photoswap token map (padding j -> j)": (4, dict(t_sf=1, t_cm=2, t_sm=3, token_map="photoswap")),
    "features in uncond rows too": (4, dict(t_sf=2, t_cm=2, t_sm=3, features_uncond=True)),
    "self maps only in small layers": (4, dict(t_sf=0, t_cm=0, t_sm=3, self_map_max_positions=16)),
    "fraction windows": (10, dict(t_sf=0.1, t_cm=0.3, t_sm=0.2, windows="photoswap")),
    "local blend": (10, dict(t_sf=1, t_cm=3, t_sm=3, local_blend=True, blend_threshold=0.9)),
    "photoswap code": (10, dict(t_sf=0.1, t_cm=0.3, t_sm=0.2, windows="photoswap", features_uncond=True,
                                self_map_max_positions=16, token_map="photoswap", local_blend=True,
                                blend_threshold=0.9)),
}


@pytest.mark.parametrize("variant", list(PHOTOSWAP_VARIANTS))
def test_photoswap_variants_match_the_reference(model, ref_factory, variant):
    steps, settings = PHOTOSWAP_VARIANTS[variant]
    sampler = build_sampler("photoswap", num_steps=steps, **settings)
    ours = project_latents(sampler, model)
    ref_settings = dict(settings)
    w_s = ref_settings.pop("guidance_superclass", None)
    ref = photoswap_reference(ref_factory(steps=steps), w_s=w_s, **ref_settings)
    assert (ours - ref).abs().max() <= 5e-5
    if variant != "project default":  # each option changes the result: the test can tell it apart
        plain = {k: settings[k] for k in ("t_sf", "t_cm", "t_sm")}
        if settings.get("windows") == "photoswap":  # against the counts int(frac·N) read as the project does
            plain = {k: int(v * steps) for k, v in plain.items()}
        default = photoswap_reference(ref_factory(steps=steps), **plain)
        assert (default - ref).abs().max() > 1e-4


def test_photoswap_token_maps(model):
    from samplers.attention import align_tokens, align_tokens_photoswap

    tok = model.components.tokenizer
    concept, superclass = "a sks dog on the beach", "a dog on the beach"
    real = len(tok(concept).input_ids)
    i_a, a_a = align_tokens(tok, superclass, concept)
    i_p, a_p = align_tokens_photoswap(tok, superclass, concept)
    assert torch.equal(a_a, a_p) and a_p[2] == 0 and a_p.sum() == len(a_p) - 1
    keep = a_p[:real].bool()
    assert torch.equal(i_a[:real][keep], i_p[:real][keep])  # the prompt's tokens: the same alignment
    assert (i_a[real:] == torch.arange(real, len(i_a)) - 1).all()  # padding: j -> j - 1
    assert (i_p[real:] == torch.arange(real, len(i_p))).all()  # Photoswap: j -> j


def test_photoswap_settings_are_checked():
    for bad, message in [(dict(windows="fractions"), "windows"), (dict(token_map="diff"), "token_map"),
                         (dict(windows="photoswap", t_sf=5, t_cm=0.2, t_sm=0.2), "t_sf=5 is outside"),
                         (dict(windows="photoswap", t_sf=0.5, t_cm=0.2, t_sm=0.6), "map \\+ output"),
                         (dict(self_map_max_positions=0), "self_map_max_positions"),
                         (dict(local_blend="yes"), "local_blend"), (dict(guidance_superclass=-1), "negative")]:
        with pytest.raises(ValueError, match=message):
            build_sampler("photoswap", **bad)


def test_photoswap_windows_as_photoswap_counts_them():
    s = build_sampler("photoswap", num_steps=50, windows="photoswap", t_sf=0.1, t_cm=0.4, t_sm=0.3)
    flags = [s.flags(i) for i in range(50)]
    assert sum(f[0] for f in flags) == 6  # i <= int(0.1 * 50): inclusive
    assert sum(f[1] for f in flags) == 20 and sum(f[2] for f in flags) == 20  # self maps: (0.3 + 0.1) * 50
    assert s.injection_steps == 20
    assert build_sampler("photoswap", num_steps=50, local_blend=True).injection_steps == 50


# --------------------------------------------------------------------------- other backbones

OPTIONS = [
    ("masked", dict(t_sw=1, mask_from="superclass")),
    ("profusion", dict(refine_steps=2, refine_seed=10, refine_images=2)),
    ("photoswap", dict(t_sf=1, t_cm=2, t_sm=3, token_map="positional", guidance_superclass=5.0)),
    ("photoswap", dict(windows="photoswap", t_sf=0.34, t_cm=0.67, t_sm=0.33, features_uncond=True,
                       self_map_max_positions=16, token_map="photoswap", local_blend=True)),
]


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-pixart"])
def test_official_options_run_on_other_backbones(preset):
    """A smoke run of every new option on SD-XL and PixArt-α (T5 tokens, masked cross-attention)."""
    m = BaseModel(load_components(preset), superclass="dog")
    for name, settings in OPTIONS:
        out = build_sampler(name, num_steps=3, **settings).sample(m, ["a {} on the beach"], num_images=2, batch_size=2)
        assert out.images.shape[0] == 2 and out.images.isfinite().all(), (preset, name, settings)


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
    assert {s["token_map"] for s in by_sampler["photoswap"]} <= {"positional" if official else "aligned", "photoswap"}
