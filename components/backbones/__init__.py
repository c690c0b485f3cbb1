"""Backbones: what differs between diffusion model families, behind one interface.

A backbone says how its text side turns prompts into a conditioning
(:meth:`Backbone.encode`) and how its denoiser predicts noise under one
(:meth:`Backbone.predict`), how its diffusers pipeline folder loads, how its tiny
random-weight preset is built, and which diffusers pipeline it corresponds to. The
sampler loop and the training step call only these, so every sampler and every method
runs on every backbone.

Adding a backbone is adding one file to this package: a :class:`Backbone` subclass
decorated with :func:`register`, naming the diffusers pipeline classes whose folders it
loads (``model_index.json``'s ``_class_name``). Every module here is imported when the
package is, so nothing else needs editing.
"""

import importlib
import pkgutil

from components.backbones.base import BACKBONES, Backbone, backbone_for_pipeline, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BACKBONES", "Backbone", "backbone_for_pipeline", "register"]
