"""The sweep planner (evaluation.planner): shared trajectory prefixes and packed UNet
batches give the images of the unshared run, for every sampler."""

from __future__ import annotations

import inspect

import pytest

from components.loader import load_components
from components.personalized import BaseModel
from evaluation.planner import SweepPlanner
from samplers import SAMPLERS, build_sampler, model_only_samplers
from samplers.base import CONCEPT, UNCOND, Sampler, Run

STEPS = 4
CELLS = [("a {} on the beach", 0), ("a {} on the beach", 1), ("a red {}", 0)]


@pytest.fixture(scope="module")
def model():
    return BaseModel(load_components("tiny"), superclass="dog")


def short(name: str, steps: int = STEPS, **extra) -> Sampler:
    """A sampler with its step-valued defaults (t_sw, t_sf, ...) scaled to ``steps``."""
    settings = {"num_steps": steps}
    for key, p in inspect.signature(SAMPLERS[name].__init__).parameters.items():
        if key.startswith("t_") and isinstance(p.default, int):
            settings[key] = max(1, min(steps, round(p.default * steps / 50)))
    return build_sampler(name, **{**settings, **extra})


def test_every_sampler_equals_its_unshared_run(model):
    """All registered samplers in one plan (two settings of the ones that share prefixes),
    cell batches that straddle templates, UNet batches smaller than a round: every image
    equals ``sample_cells`` to 1e-5, and the plan computes fewer rows than it was asked for."""
    samplers = [short(name) for name in model_only_samplers()]  # reference_guided: not plannable
    samplers += [short("switching", t_sw=2), short("masked", t_sw=1, q=0.3),
                 short("masked", t_sw=1, mask_from="superclass"),
                 short("profusion", refine_steps=2), short("profusion", refine_seed=10, refine_images=2), short("mixed", guidance_concept=0.0, guidance_superclass=7.0),
                 short("photoswap", t_sf=1, t_cm=1, t_sm=2),
                 short("photoswap", t_sf=1, t_cm=1, t_sm=2, token_map="positional", guidance_superclass=5.0),
                 short("photoswap", windows="photoswap", t_sf=0.25, t_cm=0.5, t_sm=0.25, features_uncond=True,
                       self_map_max_positions=16, token_map="photoswap", local_blend=True)]
    planner = SweepPlanner(unet_batch=7)
    planned = planner.sample(model, [(s, CELLS) for s in samplers], seed=0, batch_size=2)
    for sampler, out in zip(samplers, planned):
        ref = sampler.sample_cells(model, CELLS, seed=0, batch_size=2)
        assert out.images.shape == ref.images.shape
        assert (out.images - ref.images).abs().max() <= 1e-5, sampler
        assert out.cost == ref.cost, sampler  # cost columns stay those of the setting alone
    assert planner.stats.rows < planner.stats.naive_rows
    assert planner.stats.rows == planner.stats.padded_rows


def test_switching_shares_superclass_prefix_exactly(model):
    """superclass (ω = 7) + switching (t_sw = 2), N steps, B cells in one batch: switching
    costs nothing for steps 0-1, only c at step 2 (u is shared at the fork), then 2B rows."""
    n, b = 5, len(CELLS)
    jobs = [(build_sampler("superclass", num_steps=n), CELLS), (build_sampler("switching", num_steps=n, t_sw=2), CELLS)]
    planner = SweepPlanner(unet_batch=64)
    planner.sample(model, jobs, seed=0, batch_size=b)
    assert planner.stats.naive_rows == 2 * 2 * n * b
    assert planner.stats.rows == 2 * n * b + b + 2 * (n - 3) * b


def test_guidance_intervals_share_their_common_prefix(model):
    """A sweep over guidance_interval: the full run and [0, 2] share steps 0-1 (guided, 2B
    rows once); from step 2 the interval run takes c alone (B rows per step), whose first
    prediction is the full run's c at the fork. The images are the unshared runs'."""
    n, b = 4, len(CELLS)
    samplers = [build_sampler("concept", num_steps=n), build_sampler("concept", num_steps=n, guidance_interval=[0, 2])]
    planner = SweepPlanner(unet_batch=64)
    planned = planner.sample(model, [(s, CELLS) for s in samplers], seed=0, batch_size=b)
    assert planner.stats.naive_rows == 2 * n * b + (2 * 2 + 2) * b
    assert planner.stats.rows == 2 * n * b + b  # the interval run: only its step 3 is new
    for sampler, out in zip(samplers, planned):
        assert (out.images - sampler.sample_cells(model, CELLS, seed=0, batch_size=b).images).abs().max() <= 1e-5


def test_a_subclass_without_its_own_step_key_shares_only_step_zero(model):
    """A variant that changes the formula but inherits step_key must not reuse its parent's
    trajectory: only the predictions at x_T are shared."""
    from samplers.guidance import ConceptSampler

    class Halved(ConceptSampler):  # not registered: a variant that forgot step_key
        def guide(self, run: Run, i, t, z):
            u, c = run.predict(t, [(z, UNCOND), (z, CONCEPT)])
            return u + 0.5 * (c - u)

    n, b = 3, len(CELLS)
    jobs = [(build_sampler("concept", num_steps=n), CELLS), (Halved(num_steps=n), CELLS)]
    planner = SweepPlanner(unet_batch=64)
    out = planner.sample(model, jobs, seed=0, batch_size=b)
    assert planner.stats.rows == 2 * 2 * n * b - 2 * b  # step 0 shared, nothing else
    ref = Halved(num_steps=n).sample_cells(model, CELLS, seed=0, batch_size=b)
    assert (out[1].images - ref.images).abs().max() <= 1e-5


def test_padding_and_errors(model):
    """pad=True gives every call unet_batch rows (one shape for a compiled UNet) and the
    same images; a failing run stops the plan with its own error and restores the UNet."""
    sampler = build_sampler("mixed", num_steps=2)
    planner = SweepPlanner(unet_batch=8, pad=True)
    out = planner.sample(model, [(sampler, CELLS)], seed=0, batch_size=3)[0]
    ref = sampler.sample_cells(model, CELLS, seed=0, batch_size=3)
    assert (out.images - ref.images).abs().max() <= 1e-5
    assert planner.stats.padded_rows == 8 * planner.stats.calls > planner.stats.rows

    class Broken(Sampler):
        name = "broken-test"

        def guide(self, run, i, t, z):
            run.predict(t, [(z, UNCOND)])
            raise RuntimeError("broken on purpose")

    processors = dict(model.components.unet.attn_processors)
    with pytest.raises(RuntimeError, match="broken on purpose"):
        SweepPlanner().sample(model, [(sampler, CELLS), (Broken(num_steps=2), CELLS)], seed=0, batch_size=3)
    assert {k: type(v) for k, v in model.components.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    with pytest.raises(ValueError, match="unet_batch"):
        SweepPlanner(unet_batch=0)
