"""Every formula term by term, per step, with a fake UNet whose prediction per branch is
known: pred(z, prompt kind, t) = 0.5·z + code(kind) + 0.001·t, code u=0, c=1, s=2.

The DDIM scheduler records what each step receives (model output and latent), so each
step's guided prediction is checked against the paper's equation computed here."""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from components.loader import TINY_CONFIG
from components.tokenizer import build_tiny_tokenizer
from samplers import build_sampler
from samplers.profusion import NOISE_STREAM
from samplers.seeding import CellNoise

CODES = {"u": 0.0, "c": 1.0, "s": 2.0}
TEMPLATES = ["a {} on the beach", "a red {}"]
CELLS = [(t, i) for t in TEMPLATES for i in range(2)]


def fake_pred(z, kind, t):
    return 0.5 * z + CODES[kind] + 0.001 * float(t)


class FakeUNet(torch.nn.Module):
    """Reads the prompt kind from the embedding; records every call."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(in_channels=4, sample_size=4)
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = []  # (x, t, kind codes per row, embedding timestep per row)

    device, dtype = torch.device("cpu"), torch.float32  # as diffusers models expose them

    @property
    def attn_processors(self):
        return {}

    def set_attn_processor(self, processors):
        pass

    def forward(self, x, t, encoder_hidden_states):
        codes, steps = encoder_hidden_states[:, 0, 0], encoder_hidden_states[:, 0, 1]
        self.calls.append((x.clone(), int(t), codes.clone(), steps.clone()))
        out = 0.5 * x + codes.view(-1, 1, 1, 1) + 0.001 * float(t)
        return SimpleNamespace(sample=out)


class RecordingDDIM(DDIMScheduler):
    def step(self, model_output, timestep, sample, *args, **kwargs):
        self.records.append((model_output.clone(), int(timestep), sample.clone()))
        return super().step(model_output, timestep, sample, *args, **kwargs)


@lru_cache(maxsize=None)
def _tokenizer():
    return build_tiny_tokenizer()


class FakeComponents:
    def __init__(self):
        self.tokenizer = _tokenizer()
        self.unet = FakeUNet()
        self.vae = SimpleNamespace(
            config=SimpleNamespace(scaling_factor=1.0), dtype=torch.float32,
            decode=lambda z: SimpleNamespace(sample=z[:, :3]),
        )
        self.scheduler_records = []

    def predict(self, latents, timesteps, cond):  # the backbone seam, as StableDiffusion's
        return self.unet(latents, timesteps, encoder_hidden_states=cond).sample

    def ddim_scheduler(self):
        sched = RecordingDDIM(**{k: v for k, v in TINY_CONFIG["scheduler"].items()}, set_alpha_to_one=False)
        sched.records = self.scheduler_records
        return sched


class FakeModel:
    """A PersonalizedModel whose embedding says which prompt kind (and step) it encodes."""

    superclass = "dog"
    concept_phrase = "sks dog"

    def __init__(self, timestep_dependent=False):
        self.components = FakeComponents()
        self.timestep_dependent = timestep_dependent
        self.encode_calls = []

    def prompt_tokens(self, prompt):
        return list(range(77))

    def concept_token_positions(self, template):
        return [2]

    def encode_prompts(self, prompts, timestep=None):
        self.encode_calls.append((list(prompts), timestep))
        emb = torch.zeros(len(prompts), 77, 32)
        for b, p in enumerate(prompts):
            emb[b, :, 0] = CODES["u"] if p == "" else CODES["c"] if "sks" in p else CODES["s"]
            emb[b, :, 1] = -1 if timestep is None else timestep
        return emb


def sample(name, steps=4, model=None, **settings):
    model = model or FakeModel()
    build_sampler(name, num_steps=steps, **settings).sample(model, TEMPLATES, num_images=2, seed=5, batch_size=4)
    return model, model.components.scheduler_records, model.components.unet.calls


def kinds_of(call):
    """The branch kinds of a UNet call, from its rows' codes (4 rows per branch)."""
    codes = call[2].view(-1, 4)[:, 0].tolist()
    return [next(k for k, v in CODES.items() if v == c) for c in codes]


W = [1.0, 2.5, 0.0, 4.0]  # a per-step schedule
W2 = [3.0, 0.5, 2.0, 1.0]


@pytest.mark.parametrize("name, settings, expected", [
    ("concept", dict(guidance=W), lambda u, c, s, i: u + W[i] * (c - u)),  # eq. 4
    ("superclass", dict(guidance=W), lambda u, c, s, i: u + W[i] * (s - u)),  # eq. 5
    ("mixed", dict(guidance_concept=W, guidance_superclass=W2),
     lambda u, c, s, i: u + W2[i] * (s - u) + W[i] * (c - u)),  # eq. 6
    ("switching", dict(guidance=W, t_sw=2),
     lambda u, c, s, i: u + W[i] * ((s if i < 2 else c) - u)),  # eq. 7
    ("multistage", dict(guidance_concept=W, guidance_superclass=W2, t_sw=2),
     lambda u, c, s, i: u + (W2[i] + W[i]) * (s - u) if i < 2 else u + W2[i] * (s - u) + W[i] * (c - u)),  # eq. 8
])
def test_guidance_formulas_step_by_step(name, settings, expected):
    _, records, calls = sample(name, **settings)
    assert len(records) == len(calls) == 4
    for i, ((eps, t, z), call) in enumerate(zip(records, calls)):
        u, c, s = (fake_pred(z, k, t) for k in "ucs")
        torch.testing.assert_close(eps, expected(u, c, s, i), atol=1e-5, rtol=0)
        assert call[1] == t and torch.equal(call[0].view(-1, 4, *z.shape[1:])[0], z)  # the UNet saw z_t at t
    branch_kinds = [kinds_of(c) for c in calls]
    if name == "concept":  # W[0] = 1: u + 1(c − u) is c, so step 0 makes no empty-prompt call
        assert branch_kinds == [["c"], ["u", "c"], ["u", "c"], ["u", "c"]]
    if name == "switching":
        assert branch_kinds == [["s"], ["u", "s"], ["u", "c"], ["u", "c"]]
    if name == "multistage":
        assert branch_kinds == [["u", "s"], ["u", "s"], ["u", "c", "s"], ["u", "c", "s"]]


@pytest.mark.parametrize("name, kind", [("concept", "c"), ("superclass", "s"), ("switching", "c")])
def test_guidance_interval_guides_only_its_steps(name, kind):
    """guidance_interval [1, 3]: steps 1 and 2 are guided (u + ω(x − u), two branches); steps
    0 and 3 take x alone, in a one-branch UNet call."""
    settings = dict(guidance=W2, guidance_interval=[1, 3], **({"t_sw": 0} if name == "switching" else {}))
    _, records, calls = sample(name, **settings)
    for i, ((eps, t, z), call) in enumerate(zip(records, calls)):
        x, u = fake_pred(z, kind, t), fake_pred(z, "u", t)
        torch.testing.assert_close(eps, u + W2[i] * (x - u) if 1 <= i < 3 else x, atol=1e-5, rtol=0)
    assert [kinds_of(c) for c in calls] == [[kind], ["u", kind], ["u", kind], [kind]]


def test_masked_formula_inside_and_outside_the_mask():
    t_sw, w0c, w0s, wc, ws = 1, 0.5, 6.0, W, W2
    sampler = build_sampler("masked", num_steps=4, t_sw=t_sw, guidance_concept_0=w0c, guidance_superclass_0=w0s,
                            guidance_concept=wc, guidance_superclass=ws)
    mask = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :, :2] = True  # left half is the concept
    sampler.concept_mask = lambda maps: mask

    class StubStore:  # the fake UNet has no attention layers to capture from
        active = False

        def pop_mean(self):
            return torch.rand(4, 1, 4, 4)

    from contextlib import contextmanager

    @contextmanager
    def stub_attention(run):
        run.state["maps"] = StubStore()
        yield

    sampler.attention = stub_attention
    model = FakeModel()
    sampler.sample(model, TEMPLATES, num_images=2, seed=5, batch_size=4)
    records = model.components.scheduler_records
    for i, (eps, t, z) in enumerate(records):
        u, c, s = (fake_pred(z, k, t) for k in "ucs")
        if i < t_sw:
            expected = u + w0s * (s - u) + w0c * (c - u)  # eq. 11: mixed with ω⁰
        else:
            inside = u + wc[i] * (c - u) + ws[i] * (s - u)  # eq. 10 in M
            outside = u + (wc[i] + ws[i]) * (s - u)  # eq. 10 outside M
            expected = torch.where(mask, inside, outside)
        torch.testing.assert_close(eps, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_profusion_fusion_step_then_mixed(prediction_type, monkeypatch):
    r, w_ref, wc, ws = 0.6, W, 3.5, 2.0
    model = FakeModel()
    sched_config = dict(TINY_CONFIG["scheduler"], prediction_type=prediction_type)
    monkeypatch.setitem(TINY_CONFIG, "scheduler", sched_config)
    _, records, calls = sample("profusion", model=model, r=r, guidance_refine=w_ref,
                               guidance_concept=wc, guidance_superclass=ws)
    noise = CellNoise(CELLS, seed=5, stream=NOISE_STREAM)
    sched = DDIMScheduler(**sched_config, set_alpha_to_one=False)  # a reference that records nothing
    sched.set_timesteps(4)
    assert [kinds_of(c) for c in calls] == [["u", "c"], ["u", "c", "s"]] * 4
    z = None
    for i, (eps, t, z_fused) in enumerate(records):
        fusion_call = calls[2 * i]
        z_t = fusion_call[0][:4]
        if z is not None:
            torch.testing.assert_close(z_t, z, atol=1e-5, rtol=0)  # the fusion starts from the previous step
        a_t = float(sched.alphas_cumprod[t])
        prev = t - 1000 // 4
        a_p = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        u, c = fake_pred(z_t, "u", t), fake_pred(z_t, "c", t)
        guided = u + w_ref[i] * (c - u)
        eps_ref = guided if prediction_type == "epsilon" else a_t**0.5 * guided + (1 - a_t) ** 0.5 * z_t
        sigma2 = r**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        xi = noise.draw((4, 4, 4))
        expected = (z_t - eps_ref * sigma2 * (1 - a_t) ** 0.5 / (1 - a_p)
                    + sigma2**0.5 * xi * ((1 - a_t) * (2 - 2 * a_p - sigma2)) ** 0.5 / (1 - a_p))
        torch.testing.assert_close(z_fused, expected, atol=1e-5, rtol=0)  # fusion step
        assert torch.equal(calls[2 * i + 1][0][:4], z_fused)  # the mixed call sees the fused latent
        u, c, s = (fake_pred(z_fused, k, t) for k in "ucs")
        torch.testing.assert_close(eps, u + ws * (s - u) + wc * (c - u), atol=1e-5, rtol=0)  # eq. 6
        z = sched.step(eps, t, z_fused).prev_sample


def test_photoswap_two_trajectories_then_concept():
    model, records, calls = sample("photoswap", guidance=W, t_sf=1, t_cm=1, t_sm=2)
    assert [kinds_of(c) for c in calls] == [["u", "c", "u", "s"]] * 2 + [["u", "c"]] * 2
    for i, ((eps, t, z), call) in enumerate(zip(records, calls)):
        if i < 2:  # both trajectories in one step: z = [z_c, z_s]
            z_c, z_s = z.chunk(2)
            if i == 0:
                assert torch.equal(z_c, z_s)  # the same x_T
            x = call[0].view(4, 4, 4, 4, 4)
            assert torch.equal(x[0], z_c) and torch.equal(x[1], z_c) and torch.equal(x[2], z_s) and torch.equal(x[3], z_s)
            u_c, c, u_s, s = fake_pred(z_c, "u", t), fake_pred(z_c, "c", t), fake_pred(z_s, "u", t), fake_pred(z_s, "s", t)
            expected = torch.cat([u_c + W[i] * (c - u_c), u_s + W[i] * (s - u_s)])  # eq. 4 | eq. 5
        else:
            assert z.shape[0] == 4  # the superclass trajectory stopped
            u, c = fake_pred(z, "u", t), fake_pred(z, "c", t)
            expected = u + W[i] * (c - u)  # eq. 4
        torch.testing.assert_close(eps, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["concept", "mixed", "masked", "profusion", "photoswap"])
def test_step_wise_embeddings_are_encoded_at_every_step(name):
    """A timestep-dependent model is asked for each step's embedding; others once per batch."""
    settings = {"masked": dict(t_sw=4), "photoswap": dict(t_sf=1, t_cm=1, t_sm=1)}.get(name, {})
    stepwise, _, calls = sample(name, model=FakeModel(timestep_dependent=True), **settings)
    for x, t, codes, emb_steps in calls:
        assert torch.all(emb_steps == t)  # every row was encoded at the step it is used in
    assert {ts for _, ts in stepwise.encode_calls} == {c[1] for c in calls}
    static, _, _ = sample(name, model=FakeModel(), **settings)
    assert all(ts is None for _, ts in static.encode_calls)
    kinds = {"concept": 2, "photoswap": 3}.get(name, 3)
    assert len(static.encode_calls) == kinds  # once per prompt kind for the batch
    concept_prompts = next(p for p, _ in static.encode_calls if any("sks" in q for q in p))
    assert concept_prompts == ["a sks dog on the beach", "a red sks dog"]  # unique prompts, filled by the sampler
