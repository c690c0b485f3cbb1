"""One LightningModule per fine-tuning method, on a thin shared base.

A new method is one new file here (``lightning_modules/my_method.py`` defining a
:class:`PersonalizationModule` subclass) plus a method overlay config naming it
(``class_path: lightning_modules.MyMethod`` or ``lightning_modules.my_method.MyMethod``):
every module of this package is imported below, in name order, and the methods it defines
are exported here, so the short class path and the method list in messages find it."""

import importlib
import pkgutil

from lightning_modules.base import PersonalizationModule, load_personalized, read_artifact_manifest
from lightning_modules.dreambooth import DreamBooth, DreamBoothQKV
from lightning_modules.textual_inversion import TextualInversion
from lightning_modules.custom_diffusion import CustomDiffusion
from lightning_modules.svdiff import SVDiff
from lightning_modules.peft_adapters import BOFT, OFT, LoRA
from lightning_modules.hifi_tuner import HiFiTextualInversion

__all__ = [
    "PersonalizationModule", "load_personalized", "read_artifact_manifest",
    "DreamBooth", "DreamBoothQKV", "TextualInversion",
    "CustomDiffusion", "SVDiff", "LoRA", "OFT", "BOFT", "HiFiTextualInversion",
]


def _import_all_modules() -> None:
    """Import every module of the package (name order) and export the methods defined in the
    modules the imports above do not cover (their own bases, such as PeftAdapter, stay
    unexported)."""
    covered = {obj.__module__ for obj in globals().values() if isinstance(obj, type)}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if module.__name__ in covered:
            continue
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, PersonalizationModule) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                globals()[name] = obj
                __all__.append(name)


_import_all_modules()
