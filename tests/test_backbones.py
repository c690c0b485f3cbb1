"""Backbones (components/backbones): SD-XL and PixArt-α presets load through the real
path, their conditionings follow the diffusers pipelines, and every sampler runs on them
with the attention processors reproducing the default attention (masks included).
Parity of the concept sampler with each pipeline is in test_samplers.py."""

from __future__ import annotations

import json

import pytest
import torch

from components.conditioning import Conditioning, cat
from components.loader import build_tiny_components, load_components, preset_folder
from components.personalized import BaseModel
from samplers import build_sampler, model_only_samplers
from samplers.attention import align_tokens, concept_token_positions, token_ids

BACKBONES = {"tiny-sdxl": "sdxl", "tiny-pixart": "pixart-alpha"}
SHORT = {"switching": {"t_sw": 1}, "multistage": {"t_sw": 1}, "masked": {"t_sw": 1},
         "photoswap": {"t_sf": 1, "t_cm": 2, "t_sm": 3}}


@pytest.fixture(scope="module", params=list(BACKBONES))
def model(request):
    return BaseModel(load_components(request.param), superclass="dog")


@pytest.mark.parametrize("preset", list(BACKBONES))
def test_preset_is_a_pipeline_folder_of_its_family(preset):
    from diffusers import PixArtAlphaPipeline, StableDiffusionXLPipeline

    name = BACKBONES[preset]
    folder = preset_folder(name)
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_cls = {"sdxl": StableDiffusionXLPipeline, "pixart-alpha": PixArtAlphaPipeline}[name]
    assert index["_class_name"] == pipeline_cls.__name__
    pipe = pipeline_cls.from_pretrained(folder)
    c, ref = load_components(preset), build_tiny_components(backbone=name)
    assert c.backbone.name == name
    for part in [*ref.text_encoders(), "unet", "vae"]:
        want = getattr(ref, part).state_dict()
        got = getattr(c, part).state_dict()
        theirs = getattr(pipe, "transformer" if part == "unet" and name == "pixart-alpha" else part).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and torch.equal(theirs[k], want[k])
                                                 for k in want)
    assert c.resolution == 32


def test_conditioning_batches_like_a_tensor():
    a = Conditioning(torch.randn(2, 5, 3), {"text_embeds": torch.randn(2, 4), "mask": torch.ones(2, 5, dtype=torch.long)})
    b = Conditioning(torch.randn(1, 5, 3), {"text_embeds": torch.randn(1, 4), "mask": torch.zeros(1, 5, dtype=torch.long)})
    ab = cat([a, b])
    assert len(ab) == 3 and ab.shape == (3, 5, 3)
    assert torch.equal(ab[2].hidden_states, b.hidden_states) and torch.equal(ab[torch.tensor([2, 0])].extras["mask"][1], a.extras["mask"][0])
    half = ab.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.extras["text_embeds"].dtype == torch.float16
    assert half.extras["mask"].dtype == torch.long  # masks keep their dtype
    assert torch.equal(cat([torch.ones(1, 2), torch.zeros(1, 2)]), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(TypeError, match="cannot concatenate"):
        cat([a, torch.randn(1, 5, 3)])


def test_sdxl_conditioning_follows_the_pipeline():
    """Hidden states: penultimate layers of both encoders concatenated; text_embeds: the
    second encoder's pooled projection; the empty prompt zeroed per the pipeline config."""
    c = load_components("tiny-sdxl")
    assert c.backbone.options["force_zeros_for_empty_prompt"] is True
    pipe = c.pipeline()
    with torch.no_grad():
        cond = c.encode(["a red dog", ""])
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a red dog", do_classifier_free_guidance=True)
    assert cond.shape == (2, 77, 64) and set(cond.extras) == {"text_embeds"}
    torch.testing.assert_close(cond.hidden_states[:1], embeds, atol=1e-6, rtol=0)  # batch 2 vs 1: rounding
    torch.testing.assert_close(cond.extras["text_embeds"][:1], pooled, atol=1e-6, rtol=0)
    assert cond.hidden_states[1].abs().max() == 0 and cond.extras["text_embeds"][1].abs().max() == 0
    assert negative.abs().max() == 0 and negative_pooled.abs().max() == 0
    c.backbone.options["force_zeros_for_empty_prompt"] = False  # a model whose config does not zero it
    with torch.no_grad():
        assert c.encode([""]).hidden_states.abs().max() > 0


def test_pixart_conditioning_carries_the_t5_mask_and_the_resolution_when_asked():
    c = load_components("tiny-pixart")
    with torch.no_grad():
        cond = c.encode(["a red dog", ""])
    mask = cond.extras["encoder_attention_mask"]
    assert cond.shape == (2, 120, 32) and mask.shape == (2, 120)
    assert mask[0].sum() == 4 and mask[1].sum() == 1  # "▁a ▁red ▁dog </s>" and "</s>"
    # learned sigma: the transformer outputs 2C channels, the prediction is the first C
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        full = c.unet(x, encoder_hidden_states=cond.hidden_states, encoder_attention_mask=mask, timestep=t.expand(2),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert full.shape == (2, 8, 8, 8)
        assert torch.equal(c.predict(x, t, cond), full[:, :4])
    # the 1024 px models condition on the image size and aspect ratio
    from diffusers import PixArtTransformer2DModel

    config = dict(c.backbone.tiny_config["transformer"], use_additional_conditions=True)
    torch.manual_seed(0)
    c.unet = PixArtTransformer2DModel(**config).eval()
    with torch.no_grad():
        ours = c.predict(x, t, cond)
        size = {"resolution": torch.tensor([[32.0, 32.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
        ref = c.unet(x, encoder_hidden_states=cond.hidden_states, encoder_attention_mask=mask, timestep=t.expand(2),
                     added_cond_kwargs=size).sample[:, :4]
        other = {"resolution": torch.tensor([[64.0, 32.0]] * 2), "aspect_ratio": torch.tensor([[2.0]] * 2)}
        moved = c.unet(x, encoder_hidden_states=cond.hidden_states, encoder_attention_mask=mask, timestep=t.expand(2),
                       added_cond_kwargs=other).sample[:, :4]
    assert torch.equal(ours, ref) and not torch.allclose(ours, moved)


def test_t5_concept_tokens_and_alignment():
    tok = load_components("tiny-pixart").tokenizer
    assert tok.model_max_length == 120 and len(token_ids(tok, "a dog")) == 120
    assert concept_token_positions(tok, "a {} on the beach", "sks dog", "dog") == [1]  # no start token in T5
    assert concept_token_positions(tok, "{} on a rug", "dog", "dog") == [0]
    index, alpha = align_tokens(tok, "a dog on the beach", "a sks dog on the beach")
    assert alpha[1] == 0 and alpha[0] == 1 and index[2] == 1


def test_unknown_pipeline_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*supported pipelines"):
        load_components(tmp_path)


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", model_only_samplers())
def test_every_sampler_runs_and_restores_the_processors(model, name):
    before = dict(model.components.unet.attn_processors)
    sampler = build_sampler(name, num_steps=3, **SHORT.get(name, {}))
    out = sampler.sample(model, ["a {} on the beach"], num_images=2, seed=1, batch_size=2)
    assert out.images.shape == (2, 3, 32, 32) and out.images.isfinite().all()
    assert dict(model.components.unet.attn_processors) == before


def test_attention_control_reproduces_the_default_attention(model):
    """Masked sampling with the mask everywhere is mixed sampling, and Photoswap with the
    superclass prompt equal to the concept prompt is concept sampling: the processors that
    capture and inject compute what the default ones do (PixArt-α: with its T5 mask)."""
    templates = ["a {} on the beach", "a red {}"]
    masked = build_sampler("masked", num_steps=3, t_sw=0)
    masked.concept_mask = lambda maps: torch.ones_like(maps, dtype=torch.bool)
    mixed = build_sampler("mixed", num_steps=3)
    torch.testing.assert_close(masked.sample(model, templates).images, mixed.sample(model, templates).images,
                               atol=1e-5, rtol=0)
    same = BaseModel(model.components, superclass="dog", placeholder="")
    swap = build_sampler("photoswap", num_steps=3, t_sf=1, t_cm=2, t_sm=3).sample(same, templates)
    plain = build_sampler("concept", num_steps=3).sample(same, templates)
    torch.testing.assert_close(swap.images, plain.images, atol=1e-5, rtol=0)
    # and the maps are read: the masked sampler's result depends on the concept token's map
    assert (build_sampler("masked", num_steps=3, t_sw=0, q=0.5).sample(model, templates).images
            - mixed.sample(model, templates).images).abs().max() > 1e-4


def test_sweep_planner_packs_conditionings_of_every_backbone(model):
    """evaluate.py's planner packs and pads rows of several runs into one denoiser call:
    with SD-XL's pooled embeddings and PixArt-α's masks too, every image equals its own run."""
    from evaluation.planner import SweepPlanner

    cells = [("a {} on the beach", 0), ("a red {}", 0)]
    samplers = [build_sampler("mixed", num_steps=3), build_sampler("masked", num_steps=3, t_sw=1),
                build_sampler("switching", num_steps=3, t_sw=1)]
    planner = SweepPlanner(unet_batch=5, pad=True)
    for sampler, out in zip(samplers, planner.sample(model, [(s, cells) for s in samplers], seed=0, batch_size=2)):
        ref = sampler.sample_cells(model, cells, seed=0, batch_size=2)
        assert (out.images - ref.images).abs().max() <= 1e-5, sampler
    assert planner.stats.rows < planner.stats.naive_rows


def test_image_grid_logger_samples_every_backbone(model):
    """The grid callback draws through the project's samplers on every backbone (SD-XL:
    pooled embeddings; PixArt-α: attention masks): its images are the concept sampler's."""
    from callbacks.image_grid import ImageGridLogger

    images = ImageGridLogger(num_images=2, num_steps=2, guidance_scale=5.0).sample(model, ["a photo of {}"])
    ref = build_sampler("concept", num_steps=2, guidance=5.0).sample(model, ["a photo of {}"], num_images=2, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.isfinite().all()
    assert torch.equal(images, ref.images)


def test_memory_estimate_counts_what_the_method_trains(monkeypatch):
    """benchmarks/bench_memory.py on the meta device, with the tiny SD-XL config: the
    trainable parameters are the method's, the Adam state 12 bytes each, and gradient
    checkpointing saves fewer activations."""
    import importlib.util
    from pathlib import Path

    from conftest import make
    from lightning_modules import LoRA, SVDiff

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.BACKBONE_SETUPS, "tiny-sdxl", ("sdxl", bench.BACKBONES["sdxl"].tiny_config, 32))
    monkeypatch.setitem(bench.METHODS, "lora", ("LoRA", {"rank": 4}))
    lora, svdiff = bench.estimate("tiny-sdxl", ["lora", "svdiff"])
    for row, cls, kwargs in ((lora, LoRA, {"rank": 4}), (svdiff, SVDiff, {"train_text_encoder": True})):
        real = make(cls, {"pretrained_model": "tiny-sdxl", "frozen_dtype": "bf16", **kwargs})
        assert row["trainable_params"] == real.num_trainable_parameters() > 0
        assert row["grads_adam"] * bench.GIB == 12 * row["trainable_params"]
        assert 0 < row["activations_ckpt"] < row["activations"]
        assert 0 < row["largest_block"] < row["activations"]  # one checkpointed block's share
        assert row["total_ckpt_block"] == pytest.approx(row["total_ckpt"] + 2 * row["largest_block"])
        # weights: the bytes of every parameter and buffer in the dtype the method leaves it in
        # (SVDiff: W, U, Vᵀ bf16, σ and δ fp32), counted, not assumed
        tensors = [*real.parameters(), *real.buffers()]
        assert row["weights"] * bench.GIB == sum(t.numel() * t.element_size() for t in tensors)
    assert {t.dtype for s in real.spectral_shifts().values() for t in (s.U, s.Vh)} == {torch.bfloat16}
