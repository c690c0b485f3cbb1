"""Attention capture (masked sampling) and injection (Photoswap) through processors,
against attention computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from components.loader import load_components
from components.personalized import BaseModel
from samplers import build_sampler
from samplers.attention import (
    AttentionInjection,
    ConceptMapStore,
    align_tokens,
    attention_control,
    concept_token_positions,
    token_ids,
)

HEADS, DIM_HEAD, WIDTH, TOKENS = 4, 8, 32, 77


@pytest.fixture(scope="module")
def model():
    return BaseModel(load_components("tiny"), superclass="dog")


def layer(cross: bool) -> Attention:
    torch.manual_seed(0)
    return Attention(WIDTH, cross_attention_dim=WIDTH if cross else None, heads=HEADS, dim_head=DIM_HEAD).eval()


def by_hand(attn: Attention, x: torch.Tensor, context: torch.Tensor):
    """(probs (N, H, P, S), values (N, H, S, d)) computed without diffusers' processors."""
    def heads(t):
        return t.view(t.shape[0], t.shape[1], HEADS, DIM_HEAD).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(context)), heads(attn.to_v(context))
    return (q @ k.transpose(-1, -2) / math.sqrt(DIM_HEAD)).softmax(-1), v


def project(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    """(N, H, P, d) -> the layer output (N, P, C)."""
    return attn.to_out[0](out.transpose(1, 2).flatten(2))


# --------------------------------------------------------------------------- capture


@torch.no_grad()
def test_concept_map_capture_matches_hand_computation():
    attn, b, side = layer(cross=True), 2, 4
    x, context = torch.randn(3 * b, side * side, WIDTH), torch.randn(3 * b, TOKENS, WIDTH)  # branches u, c, s
    weights = torch.zeros(b, TOKENS)
    weights[0, 2], weights[1, [3, 4]] = 1.0, 0.5  # image 0: token 2; image 1: tokens 3 and 4
    store = ConceptMapStore(weights, (side, side), branch=1, n_branches=3)
    reference = attn(x, encoder_hidden_states=context)
    with attention_control(attn_holder(attn), store):
        store.active = True
        out = attn(x, encoder_hidden_states=context)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)  # observing changes nothing
    probs, _ = by_hand(attn, x[b : 2 * b], context[b : 2 * b])  # concept rows
    expected = torch.stack([probs[0, :, :, 2], probs[1, :, :, 3:5].mean(-1)]).mean(1)  # (B, P), mean over heads
    torch.testing.assert_close(store.pop_mean(), expected.view(b, 1, side, side), atol=1e-6, rtol=0)


class attn_holder(torch.nn.Module):
    """A module exposing one Attention layer through attn_processors / set_attn_processor."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    @property
    def attn_processors(self):
        return {"attn.processor": self.attn.processor}

    def set_attn_processor(self, processors):
        self.attn.set_processor(processors["attn.processor"])


@torch.no_grad()
def test_captured_maps_on_the_unet_have_latent_size(model):
    unet, b = model.components.unet, 2
    weights = torch.zeros(b, TOKENS)
    weights[:, 2] = 1.0
    store = ConceptMapStore(weights, (8, 8), branch=1, n_branches=3)
    x, context = torch.randn(3 * b, 4, 8, 8), torch.randn(3 * b, TOKENS, WIDTH)
    reference = unet(x, 500, encoder_hidden_states=context).sample
    with attention_control(unet, store):
        store.active = True
        out = unet(x, 500, encoder_hidden_states=context).sample
    cross_layers = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    assert store.layers == cross_layers == 4  # down 8x8, mid 4x4, up 8x8 (x2)
    maps = store.pop_mean()
    assert maps.shape == (b, 1, 8, 8)
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("q", [0.3, 0.5, 0.7, 0.9])
def test_quantile_leaves_the_asked_fraction_inside(q):
    sampler = build_sampler("masked", q=q)
    maps = torch.rand(3, 1, 8, 8)
    inside = sampler.concept_mask(maps).float().mean((1, 2, 3))  # per image
    assert inside.shape == (3,)
    assert torch.all((inside - (1 - q)).abs() <= 1 / 64 + 1e-6)
    assert sampler.concept_mask(maps).shape == maps.shape


@torch.no_grad()
def test_masked_sampler_masks_each_step_with_the_captured_map(model):
    steps, t_sw, q = 4, 1, 0.7
    sampler = build_sampler("masked", num_steps=steps, t_sw=t_sw, q=q)
    seen = []
    original = sampler.concept_mask
    sampler.concept_mask = lambda maps: seen.append(maps) or original(maps)
    out = sampler.sample(model, ["a {} on the beach", "a red {}"], num_images=2, seed=0, batch_size=4)
    assert len(seen) == steps - t_sw
    for maps in seen:
        assert maps.shape == (4, 1, 8, 8)
        assert maps.flatten(1).std(1).min() > 0  # a real map, not a constant
        inside = original(maps).float().mean((1, 2, 3))
        assert torch.all((inside - (1 - q)).abs() <= 1 / 64 + 1e-6)
    assert out.images.isfinite().all()


# --------------------------------------------------------------------------- injection


def injected(attn, x, context, **flags):
    """Run a 4-branch call [u_c, c, u_s, s] with the injection flags; returns (out, control)."""
    b = x.shape[0] // 4
    index, alpha = torch.arange(TOKENS).expand(b, TOKENS).clone(), torch.ones(b, TOKENS)
    index[:, 3:] -= 1  # the concept prompt has one extra token at position 2
    alpha[:, 2] = 0.0
    control = AttentionInjection(4, source=3, target=1, token_index=index, token_alpha=alpha)
    control.set_step(**flags)
    with attention_control(attn_holder(attn), control):
        out = attn(x, encoder_hidden_states=context)
    return out, index, alpha


@torch.no_grad()
@pytest.mark.parametrize("flags", [
    dict(features=False, cross_maps=False, self_maps=True),
    dict(features=True, cross_maps=False, self_maps=True),
    dict(features=False, cross_maps=True, self_maps=False),
])
def test_photoswap_injection_matches_hand_computation(flags):
    cross = flags["cross_maps"]
    attn, b, pixels = layer(cross), 2, 16
    x = torch.randn(4 * b, pixels, WIDTH)
    context = torch.randn(4 * b, TOKENS, WIDTH) if cross else None
    reference = attn(x, encoder_hidden_states=context)
    out, index, alpha = injected(attn, x, context, **flags)
    c, s = slice(b, 2 * b), slice(3 * b, 4 * b)
    kv = context if cross else x
    probs_s, _ = by_hand(attn, x[s], kv[s])
    probs_c, v_c = by_hand(attn, x[c], kv[c])
    if flags["features"]:
        expected_c = reference[s]  # the superclass branch's self-attention output
    elif flags["self_maps"]:
        expected_c = project(attn, probs_s @ v_c)  # superclass maps over concept values
    else:
        aligned = probs_s.gather(-1, index[:, None, None, :].expand_as(probs_s))
        a = alpha[:, None, None, :]
        expected_c = project(attn, (a * aligned + (1 - a) * probs_c) @ v_c)
    torch.testing.assert_close(out[c], expected_c, atol=1e-5, rtol=0)
    others = [r for r in range(4 * b) if not b <= r < 2 * b]
    torch.testing.assert_close(out[others], reference[others], atol=1e-5, rtol=0)
    assert (out[c] - reference[c]).abs().max() > 1e-3  # the injection did something


@torch.no_grad()
def test_photoswap_with_identical_prompts_equals_concept(model):
    """With superclass prompt == concept prompt the two trajectories coincide, so the
    injecting processors (which compute attention themselves) must reproduce concept
    sampling."""
    same = BaseModel(model.components, superclass="dog", placeholder="")
    templates = ["a {} on the beach"]
    swap = build_sampler("photoswap", num_steps=3, t_sf=1, t_cm=2, t_sm=3).sample(same, templates, num_images=2)
    plain = build_sampler("concept", num_steps=3).sample(same, templates, num_images=2)
    torch.testing.assert_close(swap.images, plain.images, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- restore, tokens


@pytest.mark.parametrize("name", ["masked", "photoswap"])
def test_processors_are_restored(model, name):
    unet = model.components.unet
    before = dict(unet.attn_processors)
    sampler = build_sampler(name, num_steps=3, **({"t_sw": 1} if name == "masked" else {"t_sf": 1, "t_cm": 2, "t_sm": 3}))
    sampler.sample(model, ["a {} on the beach"], num_images=1)
    assert dict(unet.attn_processors) == before
    calls = []

    def fail_on_second_call(module, args, out):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    hook = unet.register_forward_hook(fail_on_second_call)  # fail inside the controlled region
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sampler.sample(model, ["a {} on the beach"], num_images=1)
    finally:
        hook.remove()
    assert dict(unet.attn_processors) == before


def test_token_alignment_and_concept_tokens(model):
    tok = model.components.tokenizer
    concept, superclass = "a sks dog on the beach", "a dog on the beach"
    index, alpha = align_tokens(tok, superclass, concept)
    c_ids, s_ids = token_ids(tok, concept), token_ids(tok, superclass)
    sks = c_ids.index(tok("sks", add_special_tokens=False).input_ids[0])
    assert sks == 2 and alpha[sks] == 0
    for j in range(len(c_ids)):
        if alpha[j]:
            assert s_ids[index[j]] == c_ids[j]
    assert alpha[:sks].all() and alpha[sks + 1 : sks + 6].all()  # bos, a | dog on the beach <eos>
    assert index[sks + 1] == 2  # "dog" moved one place left
    assert concept_token_positions(tok, "a {} on the beach", "sks dog", "dog") == [2]
    assert concept_token_positions(tok, "a red {}", "sks dog", "dog") == [3]
    assert concept_token_positions(tok, "{} on a rug", "dog", "dog") == [1]  # no identifier: the phrase
