"""Train, validate, test or predict with LightningCLI.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/base.yaml --config configs/methods/lora.yaml --config configs/data/dreambooth_dog.yaml
    python train.py fit --config configs/base.yaml --config configs/methods/lora.yaml \
        --config configs/data/folder.yaml --data.concept_dir my_dog --data.superclass dog
    python train.py fit --help            # every option, with its default
    python train.py fit --config X --print_config   # the whole resolved run

Configs layer (a later ``--config`` overrides an earlier one): ``configs/base.yaml`` (trainer,
logging, checkpoints, validation grids, the artifact), a method (``configs/methods/``), a data
source (``configs/data/``). Everything a run writes goes under ``trainer.default_root_dir``
(see :func:`follow_run_folder`); ``--overwrite_artifact true`` lets the run replace an
artifact of another run there.

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
        parser.add_argument("--overwrite_artifact", type=bool, default=False,
                            help="let ExportArtifact replace an artifact of another run (another method, base model or "
                                 "concept) in its folder; without it such a run is refused before training")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        follow_run_folder(config)
        follow_seed(config)

    def instantiate_trainer(self, **kwargs):
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        make_wandb_dirs(config)
        trainer = super().instantiate_trainer(**kwargs)
        if config.get("overwrite_artifact"):
            from callbacks.export import ExportArtifact

            for callback in trainer.callbacks:
                if isinstance(callback, ExportArtifact):
                    callback.overwrite = True
        return trainer

    def before_fit(self) -> None:
        # refuse a run that would train nothing (and export untrained weights as its artifact)
        for key in ("max_steps", "max_epochs"):
            if getattr(self.trainer, key) == 0:
                raise UserError(f"--trainer.{key} 0 trains nothing",
                                fix=f"set --trainer.{key} to 1 or more (or -1 / leave it unset for no limit)")
        # refuse a run whose artifact would replace another run's, before the logger starts a run
        from callbacks.export import ExportArtifact

        for callback in self.trainer.callbacks:
            if isinstance(callback, ExportArtifact):
                callback.check(self.trainer, self.model, self.datamodule)


def _wandb_loggers(trainer_config) -> list:
    loggers = trainer_config.get("logger") if trainer_config is not None else None
    return [lg for lg in (loggers if isinstance(loggers, list) else [loggers])
            if getattr(lg, "init_args", None) is not None and str(getattr(lg, "class_path", "")).endswith("WandbLogger")]


def make_wandb_dirs(config) -> None:
    """Create each W&B logger's ``save_dir`` once the model and data are built (a mistake
    there leaves no folder behind): W&B looks for the git repository from that folder and
    warns "git root ... does not exist" when it is not there yet."""
    for logger in _wandb_loggers(config.get("trainer") if config is not None else None):
        save_dir = logger.init_args.get("save_dir")
        if save_dir not in (None, ""):
            Path(save_dir).mkdir(parents=True, exist_ok=True)


def follow_run_folder(config) -> None:
    """Outputs follow the run: with ``trainer.default_root_dir`` set, a W&B logger without a
    ``save_dir`` writes there (named after the folder), and a ModelCheckpoint without a
    ``dirpath`` writes to ``<default_root_dir>/checkpoints``; ExportArtifact's default is
    ``<log dir>/artifact`` (the W&B logger's log dir is its ``save_dir``). So
    ``--trainer.default_root_dir outputs/other`` moves the whole run, and no config names
    another run's folders."""
    trainer = config.get("trainer") if config is not None else None
    root = trainer.get("default_root_dir") if trainer is not None else None
    if not root:
        return
    for logger in _wandb_loggers(trainer):
        init_args = logger.init_args
        if init_args.get("save_dir") in (None, "", "."):
            init_args["save_dir"] = str(root)
        if not init_args.get("name"):
            init_args["name"] = Path(root).name
    for callback in trainer.get("callbacks") or []:
        init_args = getattr(callback, "init_args", None)
        if init_args is not None and str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") \
                and not init_args.get("dirpath"):
            init_args["dirpath"] = str(Path(root) / "checkpoints")


def follow_seed(config) -> None:
    """A method's and a DataModule's ``seed`` left unset take the run's ``seed_everything``
    (resolved by then: ``true`` has become a number), so ``--seed_everything 1`` is another
    training run (noise, timesteps, data order, augmentation), not only another global RNG
    state, which the training draws never read. A seed given explicitly stays."""
    seed = config.get("seed_everything") if config is not None else None
    if isinstance(seed, bool) or not isinstance(seed, int):
        return  # seed_everything: false: the modules' own default, 0
    for key in ("model", "data"):
        init_args = getattr(config.get(key), "init_args", None)
        if init_args is not None and "seed" in init_args and init_args.get("seed") is None:
            init_args["seed"] = seed


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


#: Lightning warnings that are expected in every run of this project, so not shown (each
#: would otherwise print on every ``fit``): the frozen parts of a method are in eval mode on
#: purpose; callbacks.EMA averages only the trained weights, so configure_model's sharding
#: concern does not arise; Lightning's own use of a torch API deprecated in torch 2.13.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"You're using the WeightAveraging callback with a model that overrides the configure_model",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def quiet_expected_warnings() -> None:
    import warnings

    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def main(args=None) -> PersonalizeCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_expected_warnings()
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
