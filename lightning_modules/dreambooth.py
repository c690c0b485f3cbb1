"""DreamBooth (Ruiz et al., 2023): fine-tune the UNet (optionally the text encoder) on the
concept images with a rare-token prompt ("a photo of sks dog"), with an optional
prior-preservation loss on class images.

``DreamBooth`` trains the whole denoiser (UNet, or PixArt-α's transformer);
``DreamBoothQKV`` only the attention q/k/v projections of the denoiser and the text
encoder(s), as in the sampling study's setup. On SD-XL "the text encoder" means both.
PixArt-α's T5 encoder stays frozen (as in PixArt's own fine-tuning).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_modules.base import PersonalizationModule

_T5_FROZEN = "PixArt-α's T5-XXL text encoder is not fine-tuned here (as in PixArt's own fine-tuning); set train_text_encoder: false."


def check_text_trainable(module, train_text_encoder: bool) -> None:
    """A clear error for a text-encoder option a backbone does not take."""
    if train_text_encoder and module.backbone.name == "pixart-alpha":
        raise ValueError(f"{type(module).__name__}: {_T5_FROZEN}")


class DreamBooth(PersonalizationModule):
    """Full DreamBooth.

    Args:
        train_text_encoder: also fine-tune the text encoder.
        **kwargs: see :class:`~lightning_modules.base.PersonalizationModule`.

    Artifact: diffusers model folders named as in the pipeline folder: ``unet/``
    (PixArt-α: ``transformer/``) and, with ``train_text_encoder``, ``text_encoder/``
    (SD-XL: also ``text_encoder_2/``), loadable with
    ``UNet2DConditionModel.from_pretrained(artifact, subfolder="unet")`` etc.
    """

    default_learning_rate = 5e-6  # DreamBooth, SD

    def __init__(self, *args, train_text_encoder: bool = False, **kwargs):
        super().__init__(*args, **kwargs)

    def configure_trainable(self) -> None:
        check_text_trainable(self, self.hparams.train_text_encoder)
        self.unet.requires_grad_(True)
        if self.hparams.train_text_encoder:
            for encoder in self.text_encoders().values():
                encoder.requires_grad_(True)

    def trained_parts(self) -> dict[str, torch.nn.Module]:
        """``{folder name: module}`` of what trains, named as in the pipeline folder."""
        parts = {self.backbone.denoiser_name: self.unet}
        if self.hparams.train_text_encoder:
            parts.update(self.text_encoders())
        return parts

    def save_artifact_files(self, folder: Path) -> None:
        for name, module in self.trained_parts().items():
            module.save_pretrained(folder / name, safe_serialization=True)

    def load_artifact_files(self, folder: Path) -> None:
        for name, module in {self.backbone.denoiser_name: self.unet, **self.text_encoders()}.items():
            if (folder / name).is_dir():
                # load_state_dict copies into the module's own tensors: its dtype stays
                module.load_state_dict(type(module).from_pretrained(folder / name).state_dict())


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
        check_text_trainable(self, self.hparams.train_text_encoder)
        modules = {"unet": self.unet}
        if self.hparams.train_text_encoder:
            modules.update(self.text_encoders())  # SD-XL: both encoders
        for module in modules.values():
            for name, p in module.named_parameters():
                p.requires_grad_(is_qkv(name))

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, module in {"unet": self.unet, **self.text_encoders()}.items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{name}"] = p.detach().float().cpu().contiguous()
        return out

    def save_artifact_files(self, folder: Path) -> None:
        save_file(self.trained_tensors(), str(folder / "qkv.safetensors"))

    def load_artifact_files(self, folder: Path) -> None:
        tensors = load_file(str(folder / "qkv.safetensors"))
        modules = {"unet": self.unet, **self.text_encoders()}
        for key, value in tensors.items():
            prefix, name = key.split(".", 1)
            param = modules[prefix].get_parameter(name)
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
