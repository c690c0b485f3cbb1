"""One LightningModule per fine-tuning method, on a thin shared base."""

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
