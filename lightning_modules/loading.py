"""The model a sampling command samples, checked and loaded in one place.

``sample.py``, ``evaluate.py`` (:class:`evaluation.run.ModelSource`) and ``edit.py`` sample
either a base model (hub id, diffusers folder, ``tiny``) with a concept phrase
``"<placeholder> <superclass>"``, or a trained artifact of any method (rebuilt on its own
base model unless another is given). :func:`check_model` checks the names in seconds,
before anything loads; :func:`load_model` loads, moves, casts and compiles.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from components.compile import compile_options, compile_unet
from components.loader import as_dtype, check_model_source, check_num_steps, load_components


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"``: cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model(model: str | None, artifacts: Iterable[str] = (), num_steps: int = 1) -> None:
    """The base model of every model to sample (``model``, else each artifact's own), and each
    artifact's manifest, checked in seconds (a :class:`~components.errors.UserError` naming the
    fix): a typo, a broken artifact, an unreachable hub id or more DDIM steps than the model's
    training timesteps fail before any model loads."""
    from lightning_modules.base import read_artifact_manifest

    artifacts = list(artifacts)
    if model is None and not artifacts:
        raise ValueError("Nothing to sample: give a base model (hub id, folder, 'tiny') and/or a trained artifact folder.")
    bases = {read_artifact_manifest(a)["pretrained_model"] for a in artifacts}  # every manifest checked
    for base in sorted({model} if model else bases):
        check_model_source(base)
        check_num_steps(base, num_steps)


def load_model(model: str | None, artifact: str | None = None, *, superclass: str | None = None,
               placeholder: str = "sks", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, compile: Any = None, components=None):
    """A :class:`~components.personalized.PersonalizedModel` on ``device`` in ``dtype``, its UNet
    compiled as ``compile`` says (:func:`components.compile.compile_unet`).

    With ``artifact``: the trained method rebuilt on ``model`` (default: the base it was
    trained on); ``superclass`` overrides the artifact's. Without: the base model ``model``
    with the concept phrase ``"<placeholder> <superclass>"``; ``components`` (already on
    ``device`` and in ``dtype``) are used instead of loading them again, so several
    subjects share one base model."""
    from components.personalized import BaseModel

    compile_options(compile)  # a bad value fails before the model loads
    device = resolve_device(device)
    dtype = as_dtype(dtype) if dtype is not None else None
    if artifact:
        import lightning_modules  # its load_personalized, looked up now (tests replace it)

        overrides = {"superclass": superclass} if superclass else {}
        result = lightning_modules.load_personalized(model, artifact, **overrides)
        modules = [result] if isinstance(result, torch.nn.Module) else list(result.components.modules().values())
    else:
        if components is None:
            components = load_components(model)
        result = BaseModel(components, superclass=superclass or "", placeholder=placeholder)
        modules = list(components.modules().values())
    move = {"device": device}
    if dtype is not None and dtype != result.components.unet.dtype:
        move["dtype"] = dtype  # only when it changes: diffusers warns on every dtype cast
    for module in modules:
        module.to(**move)
    compile_unet(result.components.unet, compile)
    return result
