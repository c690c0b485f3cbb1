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

from lightning.pytorch.cli import LightningCLI


class PersonalizeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.placeholder", "model.init_args.placeholder", apply_on="instantiate")
        parser.link_arguments("data.superclass", "model.init_args.superclass", apply_on="instantiate")


def main(args=None) -> PersonalizeCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
