"""Sampling strategies for personalized diffusion over one shared DDIM loop.

    from samplers import build_sampler
    sampler = build_sampler("mixed", num_steps=50, guidance_concept=3.5, guidance_superclass=3.5)
    out = sampler.sample(model, ["a {} on the beach"], num_images=4, seed=0)
    out.images, out.cost   # (N, 3, H, W) in [0, 1]; UNet evaluations per image, largest UNet batch

``model`` is any components.personalized.PersonalizedModel: the plain base model or any
fine-tuning method's artifact. Strategies: concept (eq. 4), superclass (eq. 5), mixed
(eq. 6), switching (eq. 7), multistage (eq. 8), masked (eqs. 9-11), profusion, photoswap, reference_guided (HiFi Tuner's Algorithm 2).
"""

from samplers.base import SampleOutput, Sampler, scale_at
from samplers.guidance import ConceptSampler, MixedSampler, MultiStageSampler, SuperclassSampler, SwitchingSampler
from samplers.masked import MaskedSampler
from samplers.photoswap import PhotoswapSampler
from samplers.profusion import ProFusionSampler
from samplers.reference_guided import ReferenceGuidedSampler
from samplers.registry import (
    SAMPLERS, build_sampler, load_sampler_config, parse_sampler_spec, register, sampler_from_config, sampler_spec,
)
from samplers.seeding import initial_latents


def _import_all_modules() -> None:
    """Import every module of this package, in name order, so each ``@register`` runs: a new
    sampler is one new file in ``samplers/`` (no import to add here). The explicit imports
    above name the built-in classes for ``from samplers import ...``; they import modules
    in the same name order, so ``SAMPLERS`` lists the samplers in the same order either way."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all_modules()


def model_only_samplers() -> list[str]:
    """Names of the samplers that need nothing but a model (every one but those that also
    read the concept's source images, such as ``reference_guided``), sorted."""
    return sorted(n for n, cls in SAMPLERS.items() if not getattr(cls, "needs_concept_images", False))


__all__ = [
    "model_only_samplers",
    "SAMPLERS",
    "SampleOutput",
    "Sampler",
    "build_sampler",
    "initial_latents",
    "load_sampler_config",
    "parse_sampler_spec",
    "register",
    "sampler_from_config",
    "sampler_spec",
    "scale_at",
    "ConceptSampler",
    "SuperclassSampler",
    "MixedSampler",
    "SwitchingSampler",
    "MultiStageSampler",
    "MaskedSampler",
    "ProFusionSampler",
    "PhotoswapSampler",
    "ReferenceGuidedSampler",
]
