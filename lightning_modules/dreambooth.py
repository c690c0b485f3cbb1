"""DreamBooth (Ruiz et al., 2023): fine-tune the UNet (optionally the text encoder) on the
concept images with a rare-token prompt ("a photo of sks dog"), with an optional
prior-preservation loss on class images.

``DreamBooth`` trains the whole UNet; ``DreamBoothQKV`` only the attention q/k/v
projections of the UNet and the text encoder, as in the sampling study's setup.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_modules.base import PersonalizationModule


class DreamBooth(PersonalizationModule):
    """Full DreamBooth.

    Args:
        train_text_encoder: also fine-tune the text encoder.
        **kwargs: see :class:`~lightning_modules.base.PersonalizationModule`.

    Artifact: diffusers model folders ``unet/`` (and ``text_encoder/``), loadable with
    ``UNet2DConditionModel.from_pretrained(artifact, subfolder="unet")``.
    """

    default_learning_rate = 5e-6  # DreamBooth, SD

    def __init__(self, *args, train_text_encoder: bool = False, **kwargs):
        super().__init__(*args, **kwargs)

    def configure_trainable(self) -> None:
        self.unet.requires_grad_(True)
        if self.hparams.train_text_encoder:
            self.text_encoder.requires_grad_(True)

    def save_artifact_files(self, folder: Path) -> None:
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        if self.hparams.train_text_encoder:
            self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)

    def load_artifact_files(self, folder: Path) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        dtype = self.unet.dtype
        self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
        self.unet.to(dtype)
        if (folder / "text_encoder").is_dir():
            self.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())


def is_qkv(name: str) -> bool:
    """Attention q/k/v projections: ``to_q/to_k/to_v`` (diffusers) and ``q_proj/k_proj/v_proj`` (CLIP)."""
    leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name.rsplit(".", 1)[-1]
    return leaf in {"to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj"}


class DreamBoothQKV(PersonalizationModule):
    """DreamBooth on the attention q/k/v projections of the UNet and the text encoder only.

    Args:
        train_text_encoder: also train the text encoder's q/k/v projections.

    Artifact: ``qkv.safetensors`` holding only the trained tensors (keys prefixed
    ``unet.`` / ``text_encoder.``); no diffusers loader reads a q/k/v subset, so the
    module's own ``load_artifact`` does.
    """

    default_learning_rate = 5e-6

    def __init__(self, *args, train_text_encoder: bool = True, **kwargs):
        super().__init__(*args, **kwargs)

    def configure_trainable(self) -> None:
        modules = {"unet": self.unet}
        if self.hparams.train_text_encoder:
            modules["text_encoder"] = self.text_encoder
        for module in modules.values():
            for name, p in module.named_parameters():
                p.requires_grad_(is_qkv(name))

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            for name, p in module.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{name}"] = p.detach().float().cpu().contiguous()
        return out

    def save_artifact_files(self, folder: Path) -> None:
        save_file(self.trained_tensors(), str(folder / "qkv.safetensors"))

    def load_artifact_files(self, folder: Path) -> None:
        tensors = load_file(str(folder / "qkv.safetensors"))
        modules = {"unet": self.unet, "text_encoder": self.text_encoder}
        for key, value in tensors.items():
            prefix, name = key.split(".", 1)
            param = modules[prefix].get_parameter(name)
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
