"""Exponential moving average of the weights, for the personalization methods' checkpoints.

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` keeps an averaged copy
of the module, swaps it in for validation and copies it into the module when training
ends (so ``ExportArtifact`` writes the averaged weights). The methods' checkpoints hold
only what trains (``PersonalizationModule.on_save_checkpoint``), which Lightning's callback
cannot resume from (it loads the whole module strictly); :class:`EMA` keeps its checkpoint
entries to the same trainable keys and resumes from them.

The averaged copy is the whole module (frozen parts included): right for the MiniWorld
model, twice the memory at SD size.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import EMAWeightAveraging


class EMA(EMAWeightAveraging):
    """:class:`~lightning.pytorch.callbacks.EMAWeightAveraging` (same arguments: ``decay``,
    ``update_every_n_steps``, ``update_starting_at_step`` ...) whose checkpoints hold only
    the trained tensors, as the methods' own checkpoints do, and resume."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        keep = getattr(pl_module, "checkpoint_keys", None)
        if keep is not None and "current_model_state" in checkpoint:
            keep = keep()
            checkpoint["current_model_state"] = {k: v for k, v in checkpoint["current_model_state"].items() if k in keep}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None or "current_model_state" not in checkpoint:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # the frozen base is already in both models (from its source); load what trains
        average = {"module." + k: v for k, v in checkpoint["state_dict"].items()} | checkpoint.get("averaging_state", {})
        self._average_model.load_state_dict(average, strict=False)
        pl_module.load_state_dict(checkpoint["current_model_state"], strict=False)
