"""Every sampler on a Textual Inversion and a DreamBooth artifact, reached only through
lightning_modules.load_personalized: the samplers do not know the method.

The modules are not trained here: their trainable parameters are perturbed with a fixed
seed (what a few training steps would do), so a sampler that ignored the method's
conditioning or weights would produce the base model's images and fail."""

from __future__ import annotations

import pytest
import torch

from components.personalized import BaseModel, PersonalizedModel
from conftest import build
from samplers import SAMPLERS, build_sampler

pytest.importorskip("lightning_modules")
from lightning_modules import DreamBooth, TextualInversion, load_personalized  # noqa: E402

STEPS = 2
TEMPLATES = ["a {} on the beach", "a red {}"]
SHORT = {"switching": {"t_sw": 1}, "multistage": {"t_sw": 1}, "masked": {"t_sw": 1},
         "photoswap": {"t_sf": 1, "t_cm": 1, "t_sm": 2}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g) * p.detach().std().clamp_min(0.02))
    return module.eval()


@pytest.fixture(scope="module", params=["textual_inversion", "dreambooth"])
def method(request, tmp_path_factory):
    """(in-memory module, the module reloaded from its artifact, the plain base model)."""
    if request.param == "textual_inversion":
        module = build(TextualInversion, pretrained_model="tiny", placeholder="<toy-x>", superclass="toy")
    else:
        module = build(DreamBooth, pretrained_model="tiny", placeholder="sks", superclass="toy")
    folder = perturbed(module).save_artifact(tmp_path_factory.mktemp(request.param) / "artifact")
    loaded = load_personalized(None, folder)
    base = load_personalized("tiny", superclass="toy", placeholder=module.placeholder)
    return request.param, module, loaded, base


def sample(model, name):
    sampler = build_sampler(name, num_steps=STEPS, **SHORT.get(name, {}))
    return sampler.sample(model, TEMPLATES, num_images=1, seed=0, batch_size=2)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_on_the_artifact(method, name):
    kind, module, loaded, base = method
    assert type(loaded) is type(module) and isinstance(loaded, PersonalizedModel)
    assert isinstance(base, BaseModel)
    out = sample(loaded, name)
    assert out.images.shape == (2, 3, 32, 32) and out.images.isfinite().all()
    torch.testing.assert_close(out.images, sample(module, name).images, atol=1e-5, rtol=0)  # artifact round trip
    base_images = sample(base, name).images
    if name == "superclass" and kind == "textual_inversion":
        # TI changes only the new token: the superclass prompt sees the base model unchanged
        torch.testing.assert_close(out.images, base_images, atol=1e-5, rtol=0)
    else:
        assert (out.images - base_images).abs().max() > 1e-4  # the method's conditioning or weights are used


def test_masked_sampler_locates_every_vector_of_a_multi_vector_token():
    from lightning_modules import TextualInversion
    from samplers.attention import concept_token_positions

    model = build(TextualInversion, pretrained_model="tiny", placeholder="<ball1>", superclass="ball", num_vectors=3)
    positions = concept_token_positions(model.tokenizer, "a {} on the beach", model.concept_phrase, model.superclass)
    ids = model.tokenizer(model.concept_phrase, add_special_tokens=False).input_ids
    full = model.tokenizer(f"a {model.concept_phrase} on the beach").input_ids
    assert [full[p] for p in positions] == ids and len(ids) == 3
