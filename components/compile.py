"""``compile``: the UNet through ``torch.compile``, with static shapes.

One option, taken by the sampling commands (sample.py ``--compile``), ``SamplerValidation``
(``compile=``), evaluate.py (``--compile``, config key ``compile``) and training (every
method's ``compile=``):

* ``False`` / ``None`` / ``"off"``: eager (the default);
* ``True`` / ``"default"``: ``torch.compile(mode="default")``;
* a mode name: ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"`` (Triton GEMM
  autotuning + CUDA graphs), ``"max-autotune-no-cudagraphs"``;
* a mapping of ``torch.compile`` keywords, e.g. ``{mode: max-autotune, backend: inductor}``,
  plus ``channels_last: true`` (the UNet's weights and activations in NHWC, which GPU
  convolutions prefer; same values).

The UNet is compiled in place (``nn.Module.compile``), so every holder of it (the model,
its pipeline, the samplers) calls the compiled code, with ``dynamic=False``: it compiles
once per input shape, and the samplers keep shapes few: the last batch of cells is
padded to the batch size (its extra images are dropped), and the sweep planner pads
every UNet call to ``unet_batch`` rows. Compilation happens on the first call of each
shape; benchmarks warm up outside the timed region.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: Any) -> dict | None:
    """``torch.compile`` keywords of a ``compile`` option (None: do not compile)."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("off", "false", "none", "")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("on", "true")):
        return {"mode": "default"}
    if isinstance(value, str):
        if value not in MODES:
            raise ValueError(f"compile={value!r}: choose true/false, one of {', '.join(MODES)}, or a mapping of "
                             f"torch.compile keywords such as {{mode: max-autotune}}.")
        return {"mode": value}
    if isinstance(value, Mapping):
        kw = dict(value)
        if kw.get("mode") not in (None, *MODES):
            raise ValueError(f"compile mode {kw['mode']!r}: choose one of {', '.join(MODES)}.")
        return kw
    raise ValueError(f"compile={value!r}: choose true/false, a mode ({', '.join(MODES)}) or a mapping of torch.compile keywords.")


def compile_unet(unet: torch.nn.Module, value: Any = True) -> torch.nn.Module:
    """Compile ``unet`` in place (static shapes) as ``value`` says; a no-op when off or done."""
    kw = compile_options(value)
    if kw is None or is_compiled(unet):
        return unet
    if kw.pop("channels_last", False):
        unet.to(memory_format=torch.channels_last)
    unet.compile(**{"dynamic": False, **kw})
    return unet


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


class compiled_unet:
    """Context manager: ``unet`` compiled for the duration only (validation sampling of a
    model that trains eagerly). The compiled function is kept in ``cache`` so a later
    entry reuses its compiled graphs; a UNet already compiled is left as it is."""

    def __init__(self, unet: torch.nn.Module, value: Any, cache: dict):
        self.unet, self.kw, self.cache, self.active = unet, compile_options(value), cache, False

    def __enter__(self):
        if self.kw is None or is_compiled(self.unet):
            return self.unet
        key = id(self.unet)
        if key not in self.cache:
            kw = dict(self.kw)
            if kw.pop("channels_last", False):
                self.unet.to(memory_format=torch.channels_last)
            self.cache[key] = torch.compile(self.unet._call_impl, **{"dynamic": False, **kw})
        self.unet._compiled_call_impl, self.active = self.cache[key], True
        return self.unet

    def __exit__(self, *exc):
        if self.active:
            self.unet._compiled_call_impl, self.active = None, False
        return False
