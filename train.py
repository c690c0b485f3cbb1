"""Train, validate, test or predict with LightningCLI.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/methods/dreambooth.yaml --data.concept_dir my_dog --data.superclass dog
    python train.py fit --help            # every option, with its default
    python train.py fit --config X --print_config   # the whole resolved run

``--model`` picks the method by class path (``lightning_modules.DreamBooth``,
``lightning_modules.TextualInversion``, ...). The DataModule's placeholder and
superclass (filled from the DreamBooth classes file for a DreamBooth subject) are linked
into the model, so they are set once, under ``data``. A mistake in the settings or the data
is one short message naming the fix; ``--debug`` (or ``PERSONALIZE_DEBUG=1``) shows its
traceback.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from components.errors import MissingFileError, UserError


class PersonalizeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.placeholder", "model.init_args.placeholder", apply_on="instantiate")
        parser.link_arguments("data.superclass", "model.init_args.superclass", apply_on="instantiate")

    def before_fit(self) -> None:
        # refuse a run that would train nothing (and export untrained weights as its artifact)
        for key in ("max_steps", "max_epochs"):
            if getattr(self.trainer, key) == 0:
                raise UserError(f"--trainer.{key} 0 trains nothing",
                                fix=f"set --trainer.{key} to 1 or more (or -1 / leave it unset for no limit)")


def check_checkpoint(path) -> None:
    """A checkpoint to resume from must be a whole one (torch.save writes a zip archive)."""
    if path is None or str(path) in ("last", "hpc", "best", "registry") or "://" in str(path):
        return  # resolved by Lightning
    if not Path(path).is_file():
        raise MissingFileError(f"--ckpt_path {path}: no such file", fix="pass a checkpoint written by ModelCheckpoint")
    if not zipfile.is_zipfile(path):
        raise UserError(f"--ckpt_path {path} is empty or truncated ({Path(path).stat().st_size} bytes; a run stopped "
                        "while writing it?)", fix="resume from an earlier checkpoint of the same folder")


def check_arguments(args: list[str]) -> None:
    """A ``--model`` class path (command line or ``--config`` file) that is not a method is
    one message listing the methods, not jsonargparse's page of union errors;
    a ``--ckpt_path`` that is missing, empty or truncated names the file."""
    from lightning_modules.base import method_class

    paths = []
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if key in ("--model", "--model.class_path") and "." in value and not value.endswith((".yaml", ".yml")):
            paths.append((f"--model {value}", value))
        elif key == "--config" and Path(value).is_file():
            try:
                config = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError:
                continue  # jsonargparse reports it
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and isinstance(model.get("class_path"), str):
                paths.append((f"{value}: model.class_path", model["class_path"]))
    for where, path in paths:
        if not _is_lightning_module(path):  # any LightningModule trains here; else name the methods
            method_class(path, where=where)
    for i, arg in enumerate(args):  # read by LightningCLI (for its hyperparameters) before anything else
        key, eq, value = arg.partition("=")
        if key == "--ckpt_path":
            check_checkpoint(value if eq else (args[i + 1] if i + 1 < len(args) else None))


def _is_lightning_module(path: str) -> bool:
    import importlib

    import lightning as L

    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, L.LightningModule)


def main(args=None) -> PersonalizeCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_arguments(sys.argv[1:] if args is None else list(args))
    return PersonalizeCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
        args=args,
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog="train.py")
