"""Every sampler on every method of the matrix, on every backbone (the tiny SD, SD-XL and
PixArt-α presets), reached only through lightning_modules.load_personalized: the samplers
know neither the method nor the backbone.

The modules are not trained here: their trainable parameters are perturbed with a fixed
seed (what a few training steps would do, but everywhere), so a sampler that ignored the
method's conditioning or weights would produce the base model's images and fail. Each
(backbone, method) artifact is built once (module-scoped fixture) and shared by the
samplers, and the base model's images once per backbone, placeholder and sampler. A
(backbone, method) pair that does not apply is asserted to fail with the
method's own message, before any sampling."""

from __future__ import annotations

import pytest
import torch

from components.personalized import BaseModel, PersonalizedModel
from conftest import build
from samplers import build_sampler, model_only_samplers

pytest.importorskip("lightning_modules")
from lightning_modules import (CustomDiffusion, DreamBooth, HiFiTextualInversion, SVDiff,  # noqa: E402
                               TextualInversion, load_personalized)

STEPS = 2
TEMPLATES = ["a {} on the beach", "a red {}"]
SHORT = {"switching": {"t_sw": 1}, "multistage": {"t_sw": 1}, "masked": {"t_sw": 1},
         "photoswap": {"t_sf": 1, "t_cm": 1, "t_sm": 2}}
BACKBONES = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-pixart": "pixart-alpha"}
#: the methods of the matrix, with the smallest settings that reach every code path
METHODS = {
    "textual_inversion": (TextualInversion, {"placeholder": "<toy-x>"}),
    "dreambooth": (DreamBooth, {"placeholder": "sks"}),
    "hifi": (HiFiTextualInversion, {"placeholder": "sks", "num_tokens": 2, "global_steps": 1, "num_ddim_steps": STEPS,
                                    "steps_per_timestep": 1}),
    "custom_diffusion": (CustomDiffusion, {"placeholder": "<toy-x>"}),
    "svdiff": (SVDiff, {"placeholder": "sks"}),
}
# LoRA/OFT/BOFT are left out: to a sampler they are weights, as DreamBooth and SVDiff are
# (peft wraps the attention's linear layers, the processors stay the samplers'); their
# images are checked against diffusers' own loaders in test_methods.py.
#: methods that change only the concept's tokens (the superclass prompt sees the base model)
TOKEN_ONLY = {"textual_inversion", "hifi"}
#: settings a backbone needs (PixArt-α's T5 stays frozen)
BACKBONE_KWARGS = {("tiny-pixart", "svdiff"): {"train_text_encoder": False}}
#: (backbone, method) pairs that do not apply, and the start of the reason each method gives
NOT_APPLICABLE = {
    ("tiny-pixart", "hifi"): "its c_s sits in padding positions",
    ("tiny-pixart", "textual_inversion"): "T5's embedding table is padded past its vocabulary",
    ("tiny-pixart", "custom_diffusion"): "its modifier token needs new T5 tokens",
}
PAIRS = [(b, m) for b in BACKBONES for m in METHODS if (b, m) not in NOT_APPLICABLE]


def make(backbone: str, name: str):
    cls, kwargs = METHODS[name]
    return build(cls, pretrained_model=backbone, superclass="toy", **kwargs, **BACKBONE_KWARGS.get((backbone, name), {}))


def perturbed(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                scale = p.detach().std().clamp_min(0.02) if p.numel() > 1 else 0.02  # SVDiff: 1-element shifts
                p.add_(0.5 * torch.randn(p.shape, generator=g) * scale)
    if isinstance(module, HiFiTextualInversion):
        module.phases_started.fill_(module.num_ddim_steps)  # every step-wise embedding counts as trained
    return module.eval()


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{b}-{m}" for b, m in PAIRS])
def method(request, tmp_path_factory):
    """(method name, in-memory module, the module reloaded from its artifact, backbone preset)."""
    backbone, name = request.param
    module = make(backbone, name)
    assert module.backbone.name == BACKBONES[backbone]
    folder = perturbed(module).save_artifact(tmp_path_factory.mktemp(f"{backbone}-{name}") / "artifact")
    return name, module, load_personalized(None, folder), backbone


def sample(model, name):
    sampler = build_sampler(name, num_steps=STEPS, **SHORT.get(name, {}))
    return sampler.sample(model, TEMPLATES, num_images=1, seed=0, batch_size=2)


_BASE_IMAGES: dict[tuple[str, str, str], torch.Tensor] = {}


def base_images(backbone: str, placeholder: str, name: str) -> torch.Tensor:
    """The plain base model's images (same concept phrase), computed once per backbone,
    placeholder and sampler: the methods share them."""
    key = (backbone, placeholder, name)
    if key not in _BASE_IMAGES:
        base = load_personalized(backbone, superclass="toy", placeholder=placeholder)
        assert isinstance(base, BaseModel)
        _BASE_IMAGES[key] = sample(base, name).images
    return _BASE_IMAGES[key]


def test_the_artifact_samples_as_the_module_it_was_saved_from(method):
    _, module, loaded, _ = method
    assert type(loaded) is type(module) and isinstance(loaded, PersonalizedModel)
    assert loaded.backbone.name == module.backbone.name
    torch.testing.assert_close(sample(loaded, "mixed").images, sample(module, "mixed").images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", model_only_samplers())
def test_every_sampler_runs_on_the_artifact(method, name):
    kind, module, loaded, backbone = method
    out = sample(loaded, name)
    assert out.images.shape == (2, 3, 32, 32) and out.images.isfinite().all()
    base_images_ = base_images(backbone, module.placeholder, name)
    if name == "superclass" and kind in TOKEN_ONLY:
        # TI and HiFi change only the concept's tokens: the superclass prompt sees the base model unchanged
        torch.testing.assert_close(out.images, base_images_, atol=1e-5, rtol=0)
    else:
        assert (out.images - base_images_).abs().max() > 1e-4  # the method's conditioning or weights are used


@pytest.mark.parametrize("backbone,name", list(NOT_APPLICABLE), ids=[f"{b}-{m}" for b, m in NOT_APPLICABLE])
def test_a_pair_that_does_not_apply_fails_with_the_methods_reason(backbone, name):
    """Not skipped: building the method on that backbone raises its clear error (naming the
    method, the backbone and what to use instead), so no sampler ever runs on it."""
    cls = METHODS[name][0]
    with pytest.raises(ValueError, match=f"{cls.__name__} does not apply to {BACKBONES[backbone]} models: "
                                         f"{NOT_APPLICABLE[(backbone, name)]}.*; use "):
        make(backbone, name)


def test_masked_sampler_locates_every_vector_of_a_multi_vector_token():
    from lightning_modules import TextualInversion
    from samplers.attention import concept_token_positions

    model = build(TextualInversion, pretrained_model="tiny", placeholder="<ball1>", superclass="ball", num_vectors=3)
    positions = concept_token_positions(model.tokenizer, "a {} on the beach", model.concept_phrase, model.superclass)
    ids = model.tokenizer(model.concept_phrase, add_special_tokens=False).input_ids
    full = model.tokenizer(f"a {model.concept_phrase} on the beach").input_ids
    assert [full[p] for p in positions] == ids and len(ids) == 3
