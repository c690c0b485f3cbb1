"""Adapters from peft on the UNet (and optionally the text encoder): LoRA (Hu et al.,
2022), OFT (Qiu et al., 2023) and BOFT (Liu et al., 2024).

The adapters are injected with ``add_adapter`` (diffusers' and transformers' peft glue),
so ``self.unet`` stays a ``UNet2DConditionModel`` and ``self.text_encoder`` a
``CLIPTextModel``: samplers, attention processors and callbacks work unchanged. Both
start as the identity (LoRA: B = 0; OFT/BOFT: R = I), so the model starts as the base.

Artifacts:

- LoRA: ``pytorch_lora_weights.safetensors`` in diffusers' format (keys ``unet.…lora.down/up``,
  ``text_encoder.…lora_linear_layer.down/up``, SD-XL also ``text_encoder_2.…``, the adapter
  configs in the header), read by ``StableDiffusionPipeline.load_lora_weights(folder)`` /
  ``StableDiffusionXLPipeline.load_lora_weights(folder)``. PixArt-α: keys
  ``transformer.…lora_A/lora_B`` (diffusers' transformer LoRA format, peft naming);
  diffusers 0.42 has no LoRA loader for ``PixArtAlphaPipeline`` (its transformer has no
  ``PeftAdapterMixin``), so this module's ``load_artifact`` reads it (peft's
  ``inject_adapter_in_model`` + ``set_peft_model_state_dict``).
- OFT, BOFT: no diffusers loader reads them; peft's adapter layout per model,
  ``unet/adapter_config.json`` + ``unet/adapter_model.safetensors`` (and ``text_encoder/``),
  which ``PeftModel.from_pretrained(unet, folder / "unet")`` and this module read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from lightning_modules.base import PersonalizationModule

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections
LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class PeftAdapter(PersonalizationModule):
    """Shared glue of the peft adapters: which modules get one, and the artifact.

    Args:
        unet_target_modules: names (suffixes) of the UNet modules that get an adapter.
        train_text_encoder: also adapt the text encoder.
        text_target_modules: names of the text-encoder modules that get an adapter.
        **kwargs: see :class:`~lightning_modules.base.PersonalizationModule`.
    """

    #: peft's adapter layers cast the input to the adapter's dtype and the result back,
    #: so the frozen base weights follow frozen_dtype while the adapters stay fp32
    casts_partly_trained = True

    def __init__(self, *args, unet_target_modules: Sequence[str] = UNET_TARGETS, train_text_encoder: bool = False,
                 text_target_modules: Sequence[str] = TEXT_TARGETS, **kwargs):
        super().__init__(*args, **kwargs)

    def adapter_config(self, target_modules: list[str], part: str):
        """The peft config of the adapter of ``part`` (``"unet"`` or ``"text_encoder"``)."""
        raise NotImplementedError

    def adapted(self) -> dict[str, torch.nn.Module]:
        parts = {"unet": self.unet}
        if self.hparams.train_text_encoder:
            parts.update(self.text_encoders())  # SD-XL: both encoders
        return parts

    def configure_trainable(self) -> None:
        from lightning_modules.dreambooth import check_text_trainable

        check_text_trainable(self, self.hparams.train_text_encoder)
        for part, module in self.adapted().items():
            targets = self.hparams.unet_target_modules if part == "unet" else self.hparams.text_target_modules
            add_adapter(module, self.adapter_config(list(targets), "unet" if part == "unet" else "text_encoder"))

    def adapter_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """peft-format state dicts of the adapters, ``{"unet": {...}, "text_encoder": {...}}``."""
        from peft import get_peft_model_state_dict

        return {part: {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(m).items()}
                for part, m in self.adapted().items()}

    def set_adapter_state_dict(self, part: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.adapted()[part], state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"{type(self).__name__}: the {part} artifact holds weights this adapter lacks: {unexpected[:3]}. "
                           "Rebuild the module with the artifact's init args.")

    # peft's layout: one folder per adapted model (OFT, BOFT; LoRA overrides)
    def save_artifact_files(self, folder: Path) -> None:
        for part, state in self.adapter_state_dicts().items():
            (folder / part).mkdir(exist_ok=True)
            config = self.adapted()[part].peft_config["default"].to_dict()
            config["base_model_name_or_path"] = self.hparams.pretrained_model
            (folder / part / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_jsonable))
            save_file(state, str(folder / part / PEFT_WEIGHTS_FILE))

    def load_artifact_files(self, folder: Path) -> None:
        for part in self.adapted():
            path = folder / part / PEFT_WEIGHTS_FILE
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: was the artifact saved with train_text_encoder="
                                        f"{self.hparams.train_text_encoder}?")
            self.set_adapter_state_dict(part, load_file(str(path)))


def add_adapter(module: torch.nn.Module, config) -> None:
    """peft's adapter through the model's own ``add_adapter`` (diffusers' and transformers'
    glue), or, for models without one (PixArt-α's transformer), peft's injection with the
    config kept where peft's state-dict helpers look for it."""
    if hasattr(module, "add_adapter"):
        module.add_adapter(config)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name="default")
    module.peft_config = {"default": config}


def _jsonable(value):
    return sorted(value) if isinstance(value, set) else str(value)


class LoRA(PeftAdapter):
    """LoRA: W + (α/r)·B·A with rank-r factors A, B; B starts at 0.

    Args:
        rank: r of the UNet adapters.
        alpha: α (default: r, so the scale α/r is 1, as in diffusers' DreamBooth-LoRA).
        dropout: dropout on the LoRA branch.
        text_rank: r of the text-encoder adapters (default: ``rank``).
        **kwargs: see :class:`PeftAdapter`.

    Artifact: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(folder)``.
    """

    default_learning_rate = 1e-4  # diffusers' DreamBooth-LoRA example (rank 4)

    def __init__(self, *args, rank: int = 4, alpha: float | None = None, dropout: float = 0.0,
                 text_rank: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)

    def adapter_config(self, target_modules: list[str], part: str):
        from peft import LoraConfig

        hp = self.hparams
        rank = hp.rank if part == "unet" else (hp.text_rank or hp.rank)
        alpha = (hp.rank if hp.alpha is None else hp.alpha) * rank / hp.rank  # the same scale α/r for both parts
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=hp.dropout, target_modules=target_modules,
                          init_lora_weights="gaussian")

    def save_artifact_files(self, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        states = self.adapter_state_dicts()
        meta = {part: {**m.peft_config["default"].to_dict(), "base_model_name_or_path": None}
                for part, m in self.adapted().items()}
        if self.backbone.name == "pixart-alpha":  # no diffusers pipeline saves or loads it: the transformer format
            tensors = {f"transformer.{k}": v for k, v in states["unet"].items()}
            header = {"format": "pt", "transformer_lora_adapter_metadata": json.dumps(meta["unet"], default=_jsonable)}
            save_file(tensors, str(folder / LORA_FILE), metadata=header)
            return
        pipeline = StableDiffusionXLPipeline if self.backbone.name == "sdxl" else StableDiffusionPipeline
        kwargs = {}
        for part in self.text_encoders():
            kwargs[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(states[part]) if part in states else None
            kwargs[f"{part}_lora_adapter_metadata"] = meta.get(part)
        pipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(states["unet"]),
                                   unet_lora_adapter_metadata=meta["unet"], weight_name=LORA_FILE, **kwargs)

    def load_artifact_files(self, folder: Path) -> None:
        from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

        tensors = load_file(str(folder / LORA_FILE))
        denoiser = "transformer" if self.backbone.name == "pixart-alpha" else "unet"
        parts = {denoiser: {}, **{part: {} for part in self.text_encoders()}}
        for key, value in tensors.items():
            prefix, _, name = key.partition(".")
            if prefix not in parts:
                raise KeyError(f"{folder / LORA_FILE}: entry {key!r} is none of {sorted(p + '.*' for p in parts)}")
            parts[prefix][name] = value
        if any(parts[p] for p in self.text_encoders()) and not self.hparams.train_text_encoder:
            raise ValueError(f"{folder / LORA_FILE} holds text-encoder LoRA weights: rebuild with train_text_encoder=True.")
        if denoiser == "transformer":
            self.set_adapter_state_dict("unet", parts["transformer"])  # already peft naming
        else:
            self.set_adapter_state_dict("unet", convert_unet_state_dict_to_peft(parts["unet"]))
        if self.hparams.train_text_encoder:
            for part in self.text_encoders():
                self.set_adapter_state_dict(part, convert_state_dict_to_peft(parts[part]))


class OFT(PeftAdapter):
    """OFT: W·R with a block-diagonal orthogonal R (Cayley parametrization), R = I at start.

    Args:
        block_size: size of each orthogonal block (give this or ``num_blocks``); must
            divide the adapted layers' input dimension.
        num_blocks: number of blocks per layer instead (peft's ``r``).
        coft: constrained OFT (COFT): keep R within ``eps`` of the identity.
        eps: COFT's radius.
        dropout: peft's multiplicative module dropout.
        **kwargs: see :class:`PeftAdapter`.
    """

    default_learning_rate = 3e-5  # peft's examples/boft_dreambooth (SD 2.1)

    def __init__(self, *args, block_size: int = 32, num_blocks: int = 0, coft: bool = False, eps: float = 6e-5,
                 dropout: float = 0.0, **kwargs):
        if (block_size > 0) == (num_blocks > 0):
            raise ValueError(f"OFT: give exactly one of block_size={block_size} and num_blocks={num_blocks} (the other 0).")
        super().__init__(*args, **kwargs)

    def adapter_config(self, target_modules: list[str], part: str):
        from peft import OFTConfig

        hp = self.hparams
        return OFTConfig(r=hp.num_blocks, oft_block_size=hp.block_size, coft=hp.coft, eps=hp.eps,
                         module_dropout=hp.dropout, target_modules=target_modules)


class BOFT(PeftAdapter):
    """BOFT: OFT whose orthogonal matrix is a product of butterfly factors.

    Args:
        block_size: BOFT block size (give this or ``num_blocks``).
        num_blocks: number of BOFT blocks per layer instead.
        butterfly_factor: number of butterfly factors (1 = OFT). peft computes factors
            > 1 with its CUDA extension; where that cannot be built (CPU-only machines)
            peft falls back to 1 with a warning.
        dropout: peft's multiplicative dropout of BOFT blocks.
        **kwargs: see :class:`PeftAdapter`.
    """

    default_learning_rate = 3e-5  # peft's examples/boft_dreambooth (SD 2.1)

    def __init__(self, *args, block_size: int = 0, num_blocks: int = 8, butterfly_factor: int = 1,
                 dropout: float = 0.0, **kwargs):
        if (block_size > 0) == (num_blocks > 0):
            raise ValueError(f"BOFT: give exactly one of block_size={block_size} and num_blocks={num_blocks} (the other 0).")
        super().__init__(*args, **kwargs)

    def adapter_config(self, target_modules: list[str], part: str):
        from peft import BOFTConfig

        hp = self.hparams
        return BOFTConfig(boft_block_size=hp.block_size, boft_block_num=hp.num_blocks,
                          boft_n_butterfly_factor=hp.butterfly_factor, boft_dropout=hp.dropout,
                          target_modules=target_modules)
