"""One LightningModule per fine-tuning method, on a thin shared base."""

from lightning_modules.base import PersonalizationModule, load_personalized, read_artifact_manifest
from lightning_modules.dreambooth import DreamBooth, DreamBoothQKV
from lightning_modules.textual_inversion import TextualInversion

__all__ = [
    "PersonalizationModule", "load_personalized", "read_artifact_manifest",
    "DreamBooth", "DreamBoothQKV", "TextualInversion",
]
