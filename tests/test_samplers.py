"""Samplers on the tiny preset: parity with diffusers, reductions, reproducibility, cost,
validation. Formulas term by term are in test_samplers_fake.py, attention in
test_samplers_attention.py."""

from __future__ import annotations

import pytest
import torch

from components.loader import load_components
from components.personalized import BaseModel
from samplers import SAMPLERS, build_sampler, initial_latents, model_only_samplers

STEPS = 4
TEMPLATES = ["a {} on the beach", "a red {}"]
#: step settings that fit a 3-step run (the defaults assume 50 steps)
SHORT = {"switching": {"t_sw": 1}, "multistage": {"t_sw": 1}, "masked": {"t_sw": 1}, "photoswap": {"t_sf": 1, "t_cm": 2, "t_sm": 2}}


@pytest.fixture(scope="module")
def model():
    return BaseModel(load_components("tiny"), superclass="dog")


def run(model, name, batch_size=4, num_images=2, **settings):
    return build_sampler(name, num_steps=STEPS, **settings).sample(
        model, TEMPLATES, num_images=num_images, seed=0, batch_size=batch_size
    )


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("preset", ["tiny", "tiny-v", "tiny-sdxl", "tiny-pixart"])
def test_concept_sampler_matches_diffusers_pipeline(preset):
    """Against StableDiffusionPipeline, StableDiffusionXLPipeline (zeroed empty prompt,
    pooled embedding, time ids) and PixArtAlphaPipeline (T5 mask, learned sigma)."""
    model = BaseModel(load_components(preset), superclass="dog")
    out = run(model, "concept", batch_size=3, guidance=7.0)  # a batch that straddles the two templates
    latents = torch.stack([initial_latents(t, i, 0, (4, 8, 8)) for t in TEMPLATES for i in range(2)])
    prompts = [t.format("sks dog") for t in TEMPLATES for _ in range(2)]
    pipe = model.components.pipeline()
    assert type(pipe).__name__ == {"sdxl": "StableDiffusionXLPipeline", "pixart-alpha": "PixArtAlphaPipeline"}.get(
        model.components.backbone.name, "StableDiffusionPipeline")
    pipe.set_progress_bar_config(disable=True)
    extra = dict(use_resolution_binning=False, clean_caption=False) if preset == "tiny-pixart" else {}
    ref = pipe(prompts, num_inference_steps=STEPS, guidance_scale=7.0, latents=latents, output_type="pt", **extra).images
    assert out.images.shape == ref.shape == (4, 3, 32, 32)
    torch.testing.assert_close(out.images, ref, atol=1e-5, rtol=0)
    assert out.templates == [t for t in TEMPLATES for _ in range(2)] and out.indices == [0, 1, 0, 1]


# --------------------------------------------------------------------------- reductions

REDUCTIONS = {
    "mixed(w_s=0) == concept": (("mixed", dict(guidance_concept=5.0, guidance_superclass=0.0)), ("concept", dict(guidance=5.0))),
    "switching(t_sw=0) == concept": (("switching", dict(t_sw=0)), ("concept", dict(guidance=7.0))),
    "switching(t_sw=all) == superclass": (("switching", dict(t_sw=STEPS)), ("superclass", dict(guidance=7.0))),
    "multistage(t_sw=0) == mixed": (
        ("multistage", dict(t_sw=0, guidance_concept=4.0, guidance_superclass=3.0)),
        ("mixed", dict(guidance_concept=4.0, guidance_superclass=3.0)),
    ),
    "masked(t_sw=all) == mixed(w0)": (
        ("masked", dict(t_sw=STEPS, guidance_concept_0=1.0, guidance_superclass_0=6.0)),
        ("mixed", dict(guidance_concept=1.0, guidance_superclass=6.0)),
    ),
    "profusion(r=0) == mixed": (("profusion", dict(r=0.0)), ("mixed", dict())),
    "photoswap(0, 0, 0) == concept": (("photoswap", dict(t_sf=0, t_cm=0, t_sm=0)), ("concept", dict(guidance=7.0))),
}


@pytest.mark.parametrize("case", list(REDUCTIONS))
def test_reductions(model, case):
    (a, settings_a), (b, settings_b) = REDUCTIONS[case]
    torch.testing.assert_close(run(model, a, **settings_a).images, run(model, b, **settings_b).images, atol=1e-5, rtol=0)


def test_masked_with_mask_everywhere_equals_mixed(model):
    """Also shows that the capturing attention processor computes what the default one does."""
    masked = build_sampler("masked", num_steps=STEPS, t_sw=0)
    masked.concept_mask = lambda maps: torch.ones_like(maps, dtype=torch.bool)
    out = masked.sample(model, TEMPLATES, num_images=2, seed=0, batch_size=4)
    torch.testing.assert_close(out.images, run(model, "mixed").images, atol=1e-5, rtol=0)


def test_reductions_are_not_vacuous(model):
    """The settings that the reductions switch off change the images."""
    images = {
        "concept": run(model, "concept").images,
        "superclass": run(model, "superclass").images,
        "mixed": run(model, "mixed").images,
        "switching": run(model, "switching", t_sw=2).images,
        "multistage": run(model, "multistage", t_sw=2).images,
        "masked": run(model, "masked", t_sw=1).images,
        "profusion": run(model, "profusion", r=1.0).images,
        "photoswap": run(model, "photoswap", t_sf=1, t_cm=2, t_sm=3).images,
    }
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (images[a] - images[b]).abs().max() > 1e-4, f"{a} and {b} give the same images"


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", model_only_samplers())
def test_same_call_twice_is_bit_identical(model, name):
    sampler = build_sampler(name, num_steps=3, **SHORT.get(name, {}))
    a = sampler.sample(model, TEMPLATES, num_images=2, seed=3, batch_size=3).images
    b = sampler.sample(model, TEMPLATES, num_images=2, seed=3, batch_size=3).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["profusion", "masked", "photoswap"])
def test_each_cell_is_independent_of_batching(model, name):
    """x_T and ProFusion's noise are per cell, masks per image: batch size changes nothing."""
    sampler = build_sampler(name, num_steps=3, **SHORT.get(name, {}))
    together = sampler.sample(model, TEMPLATES, num_images=2, seed=1, batch_size=4)
    one_by_one = sampler.sample(model, TEMPLATES, num_images=2, seed=1, batch_size=1)
    reordered = sampler.sample_cells(model, [("a red {}", 1), ("a {} on the beach", 0)], seed=1)
    torch.testing.assert_close(together.images, one_by_one.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.images[0], together.images[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.images[1], together.images[0], atol=1e-5, rtol=0)


def test_initial_latents_depend_on_template_index_and_seed_only():
    x = initial_latents("a {} on the beach", 2, 7, (4, 8, 8))
    assert x.shape == (4, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, initial_latents("a {} on the beach", 2, 7, (4, 8, 8)))
    for other in [("a red {}", 2, 7), ("a {} on the beach", 3, 7), ("a {} on the beach", 2, 8)]:
        assert not torch.allclose(x, initial_latents(*other, (4, 8, 8)))
    assert abs(x.mean()) < 0.3 and 0.7 < x.std() < 1.3


def test_explicit_indices(model):
    sampler = build_sampler("concept", num_steps=3)
    all_images = sampler.sample(model, TEMPLATES[:1], num_images=3, seed=0)
    picked = sampler.sample(model, TEMPLATES[:1], seed=0, indices=[2, 0])
    assert picked.indices == [2, 0]
    torch.testing.assert_close(picked.images, all_images.images[[2, 0]], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- cost

COSTS = {  # name, settings -> (UNet evaluations per image over 4 steps, largest UNet batch per image)
    "concept": ({}, 8, 2),
    "superclass": ({}, 8, 2),
    "mixed": ({}, 12, 3),
    "switching": ({"t_sw": 2}, 8, 2),
    "multistage": ({"t_sw": 2}, 2 * 2 + 2 * 3, 3),
    "masked": ({"t_sw": 2}, 12, 3),
    "profusion": ({}, 4 * (2 + 3), 3),
    "photoswap": ({"t_sf": 4, "t_cm": 4, "t_sm": 4}, 16, 4),
    "photoswap (superclass stops after t_sm)": ({"t_sf": 1, "t_cm": 2, "t_sm": 3}, 3 * 4 + 2, 4),
    "concept (guided steps 0, 1 only)": ({"guidance_interval": [0, 2]}, 2 * 2 + 2 * 1, 2),
    "concept (guidance 1: never the empty prompt)": ({"guidance": 1.0}, 4, 1),
}


@pytest.mark.parametrize("case", list(COSTS))
def test_reported_cost_matches_the_unet_work(model, case):
    settings, evals, max_batch = COSTS[case]
    rows = []
    hook = model.components.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        out = run(model, case.split()[0], batch_size=3, num_images=2, **settings)  # 4 images: batches of 3 and 1
    finally:
        hook.remove()
    assert out.cost == {"unet_evals_per_image": evals, "max_unet_batch": max_batch}
    assert sum(rows) == evals * 4
    assert max(rows) == max_batch * 3


# --------------------------------------------------------------------------- validation

BAD = [
    ("nonesuch", {}, "unknown sampler 'nonesuch'; choose one of"),
    ("concept", {"guidance": -1.0}, "concept: guidance=-1.0 is negative"),
    ("mixed", {"guidance_superclass": -0.5}, "mixed: guidance_superclass=-0.5 is negative"),
    ("mixed", {"guidance": 3.0}, "mixed: unknown setting(s) guidance; its settings are"),
    ("switching", {"num_steps": 50, "t_sw": 60}, "switching: t_sw=60 is beyond num_steps=50; choose 0 <= t_sw <= 50"),
    ("multistage", {"num_steps": 10, "t_sw": -1}, "multistage: t_sw=-1 is beyond num_steps=10"),
    ("masked", {"q": 1.0}, "masked: q=1.0 is outside (0, 1); choose 0 < q < 1"),
    ("masked", {"q": 0}, "masked: q=0 is outside (0, 1)"),
    ("profusion", {"r": 1.5}, "profusion: r=1.5 is outside [0, 1]"),
    ("photoswap", {"num_steps": 20, "t_sm": 25}, "photoswap: t_sm=25 is beyond num_steps=20"),
    ("photoswap", {"t_cm": 2.5}, "photoswap: t_cm=2.5 must be an integer"),
    ("concept", {"num_steps": 0}, "concept: num_steps=0 must be a positive integer"),
    ("concept", {"num_steps": 3, "guidance": [7, 7]}, "concept: guidance has 2 values but num_steps=3"),
    ("concept", {"num_steps": 10, "guidance_interval": [0, 11]}, "concept: guidance_interval=[0, 11] must be [start, stop]"),
    ("superclass", {"guidance_interval": [5, 2]}, "with 0 <= start <= stop <= num_steps=50 (e.g. [0, 25])"),
    ("switching", {"guidance_interval": 25}, "switching: guidance_interval=25 must be [start, stop]"),
]


@pytest.mark.parametrize("name, settings, message", BAD)
def test_bad_settings_are_rejected_with_a_clear_message(name, settings, message):
    with pytest.raises(ValueError) as err:
        build_sampler(name, **settings)
    assert message in str(err.value)


def test_settings_round_trip():
    sampler = build_sampler("masked", num_steps=20, q=0.5, guidance_concept=[1.0] * 20)
    settings = sampler.settings()
    assert settings["q"] == 0.5 and settings["guidance_concept"] == [1.0] * 20 and settings["t_sw"] == 3
    assert build_sampler(sampler.name, **settings).settings() == settings
    # a setting added later is left out at its default: folders and results made before it still match
    assert build_sampler("concept", guidance=3.0).settings() == {"num_steps": 50, "guidance": 3.0}
    assert build_sampler("concept", guidance_interval=[0, 25]).settings()["guidance_interval"] == [0, 25]


def test_per_step_guidance_schedule(model):
    constant = run(model, "mixed", guidance_concept=[3.5] * STEPS, guidance_superclass=3.5).images
    torch.testing.assert_close(constant, run(model, "mixed").images, atol=0, rtol=0)
    ramp = run(model, "mixed", guidance_concept=[3.5, 3.5, 3.5, 0.0], guidance_superclass=3.5).images
    assert (ramp - constant).abs().max() > 1e-4


def test_guidance_interval_is_the_schedule_with_one_outside(model):
    """[start, stop] is the per-step schedule that is ω inside and 1 outside, bit for bit; and
    a step at ω = 1 (c alone) agrees with u + 1·(c − u) up to rounding."""
    interval = run(model, "concept", guidance=5.0, guidance_interval=[1, 3]).images
    schedule = run(model, "concept", guidance=[1.0, 5.0, 5.0, 1.0]).images
    torch.testing.assert_close(interval, schedule, atol=0, rtol=0)
    assert (interval - run(model, "concept", guidance=5.0).images).abs().max() > 1e-4
    assert build_sampler("concept", guidance_interval=(0, 25)).settings()["guidance_interval"] == [0, 25]
    unguided = run(model, "concept", guidance=1.0).images  # c alone, one branch per step
    three_branches = run(model, "mixed", guidance_concept=1.0, guidance_superclass=0.0).images  # u + 0(s − u) + 1(c − u)
    torch.testing.assert_close(unguided, three_branches, atol=1e-5, rtol=0)


def test_templates_need_a_slot(model):
    with pytest.raises(ValueError, match="no '\\{\\}' slot"):
        build_sampler("concept", num_steps=2).sample(model, ["a dog on the beach"])


def test_configs_hold_the_study_defaults():
    from pathlib import Path

    from samplers import load_sampler_config

    folder = Path(__file__).resolve().parents[1] / "configs" / "samplers"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(SAMPLERS)
    for path in folder.glob("*.yaml"):
        name, settings = load_sampler_config(path)
        assert name == path.stem
        assert build_sampler(name, **settings).settings() == SAMPLERS[name]().settings()  # defaults == YAML
    assert load_sampler_config(folder / "masked.yaml")[1] == dict(
        num_steps=50, guidance_concept=3.5, guidance_superclass=3.5, t_sw=3,
        guidance_concept_0=0.0, guidance_superclass_0=7.0, q=0.7, mask_from="concept",
    )
