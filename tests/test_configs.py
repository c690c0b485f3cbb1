"""Configs that layer: ``configs/base.yaml`` + a method (``configs/methods/``) + a data
source (``configs/data/``), composed with repeated ``--config``; outputs that follow the run
(``trainer.default_root_dir``); an artifact of another run never silently replaced.

Every method × data composition is parsed and instantiated by LightningCLI's own parser
(``run=False``: model, DataModule and Trainer built, nothing trained) in a folder where
the data configs' paths exist: a stand-in DreamBooth layout (``../shared/dreambooth``
with a ``dog`` subject), a ``my_concept`` folder and the MiniWorld concept."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components.errors import run_command
from conftest import repo_workdir

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))
DATA = sorted((ROOT / "configs" / "data").glob("*.yaml"))
#: the tiny preset of each base model's family
TINY = {"stabilityai/stable-diffusion-xl-base-1.0": "tiny-sdxl", "PixArt-alpha/PixArt-XL-2-512x512": "tiny-pixart"}
#: settings a CPU test needs (bf16 autocast and frozen bf16 weights are slow on a CPU)
CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]


def write_concept(folder: Path, size: int, n: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        rgb = np.full((size, size, 3), (40 * i, 120, 200), np.uint8)
        Image.fromarray(rgb).save(folder / f"{i:02d}.png")
        Image.fromarray(np.full((size, size), 255, np.uint8)).save(folder / f"{i:02d}_mask.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder to run train.py from, holding what the data configs name: configs/ and
    miniworld/ of the repository, ../shared/dreambooth (subject "dog") and my_concept/
    (images of 1024 px, the largest resolution of a method config, with masks)."""
    cwd = repo_workdir(tmp_path_factory.mktemp("layered"), {"dog": "dog"}, lambda folder: write_concept(folder, 1024))
    write_concept(cwd / "my_concept", 1024)
    return cwd


def layered(method: Path, data: Path | None = None, relative: bool = True) -> list[str]:
    configs = [ROOT / "configs" / "base.yaml", method] + ([data] if data else [])
    return [a for c in configs for a in ("--config", str(c.relative_to(ROOT) if relative else c))]


def instantiate(args: list[str]):
    """LightningCLI as train.py builds it, without running: the model, DataModule, Trainer."""
    from train import PersonalizeCLI

    return PersonalizeCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, run=False)


def test_method_configs_hold_only_the_method():
    """A method config names its method and hyperparameters, never data or callbacks (so
    a data config decides the images and base.yaml alone holds the callback list)."""
    assert {p.stem for p in METHODS} >= {"dreambooth", "dreambooth_qkv", "dreambooth_pixart", "textual_inversion",
                                         "custom_diffusion", "svdiff", "svdiff_sdxl", "lora", "oft", "boft",
                                         "hifi_tuner"}
    assert {p.stem for p in DATA} >= {"dreambooth_dog", "folder", "miniworld_ball"}
    for path in METHODS:
        cfg = yaml.safe_load(path.read_text())
        assert set(cfg) <= {"model", "data", "trainer"}, path
        assert cfg["model"]["class_path"].startswith("lightning_modules."), path
        assert set(cfg.get("data", {}).get("init_args", {})).isdisjoint(
            {"concept_dir", "dreambooth_root", "subject", "superclass"}), path
        assert set(cfg["trainer"]) <= {"precision", "max_steps", "max_epochs", "default_root_dir"}, path
    for path in DATA:
        cfg = yaml.safe_load(path.read_text())
        assert "trainer" not in cfg and "class_path" not in cfg.get("model", {}), path
    base = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    assert [c["class_path"].rsplit(".", 1)[-1] for c in base["trainer"]["callbacks"]] == \
        ["ModelCheckpoint", "ImageGridLogger", "ExportArtifact"]
    dirpaths = [c.get("init_args", {}).get("dirpath") for c in base["trainer"]["callbacks"]]
    assert dirpaths == [None, None, None]  # outputs follow default_root_dir


@pytest.mark.parametrize("data", DATA, ids=lambda p: p.stem)
@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_every_method_layers_with_every_data_config(method, data, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    method_cfg = yaml.safe_load(method.read_text())
    cli = instantiate([*layered(method, data), *CPU])
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    assert type(model).__name__ == method_cfg["model"]["class_path"].rsplit(".", 1)[-1]
    # the method's hyperparameters survive the data config...
    for key, value in method_cfg["model"]["init_args"].items():
        if key not in ("pretrained_model", "frozen_dtype") or data.stem != "miniworld_ball":
            assert model.hparams[key] == value, (key, model.hparams[key], value)
    for key, value in method_cfg.get("data", {}).get("init_args", {}).items():
        if key == "class_dir":
            assert dm.class_dir == value.replace("{}", dm.superclass)
            continue
        if not (key in ("resolution", "batch_size") and data.stem == "miniworld_ball"):
            assert dm.hparams.get(key, getattr(dm, key, None)) == value, key
    assert model.placeholder == dm.placeholder == method_cfg.get("data", {}).get("init_args", {}).get("placeholder", "sks")
    # ...and the data config decides the images
    expected = {"dreambooth_dog": (workdir.parent / "shared" / "dreambooth" / "dog", "dog"),
                "folder": (Path("my_concept"), "dog"), "miniworld_ball": (None, "ball")}[data.stem]
    if expected[0] is not None:
        assert Path(dm.concept_dir).resolve() == expected[0].resolve()
    else:
        assert json.loads((Path(dm.concept_dir) / "concept.json").read_text())["name"] == "orange_checkered_ball"
        assert model.hparams.pretrained_model == "miniworld/pretrained/sd" and dm.hparams.resolution == 32
    assert model.superclass == dm.superclass == expected[1]
    # outputs follow the run's folder (the method's default_root_dir)
    root = Path(method_cfg["trainer"]["default_root_dir"])
    assert Path(trainer.default_root_dir).resolve() == root.resolve()
    assert Path(trainer.logger.save_dir) == root and trainer.logger._wandb_init["name"] == root.name
    ckpt = [c for c in trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert len(ckpt) == 1 and Path(ckpt[0].dirpath).resolve() == (root / "checkpoints").resolve()
    export = [c for c in trainer.callbacks if type(c).__name__ == "ExportArtifact"]
    assert len(export) == 1 and export[0].resolve_dir(trainer) == root / "artifact"
    assert trainer.max_steps == method_cfg["trainer"]["max_steps"]


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_every_method_config_builds_on_its_tiny_preset(method, workdir, monkeypatch):
    """The method's hyperparameters are valid for its model family: the module is built
    (configure_model, as the Trainer does) on the tiny preset of its base model."""
    monkeypatch.chdir(workdir)
    base = yaml.safe_load(method.read_text())["model"]["init_args"]["pretrained_model"]
    cli = instantiate([*layered(method, ROOT / "configs" / "data" / "folder.yaml"), *CPU,
                       "--model.init_args.pretrained_model", TINY.get(base, "tiny"), "--data.resolution", "32",
                       "--data.allow_upscale", "true"])
    cli.model.configure_model()
    assert cli.model.num_trainable_parameters() > 0


def test_seed_everything_seeds_the_training_draws(workdir, monkeypatch):
    """--seed_everything N is another training run: the method's noise / timestep seed and the
    DataModule's order / augmentation seed follow it unless set explicitly; the generators
    the training draws from differ with it."""
    monkeypatch.chdir(workdir)
    args = [*layered(METHODS[0], ROOT / "configs" / "data" / "folder.yaml"), *CPU,
            "--model.init_args.pretrained_model", "tiny", "--data.resolution", "32", "--data.allow_upscale", "true"]
    seeds = {}
    for extra in ([], ["--seed_everything", "3"], ["--seed_everything", "3", "--model.init_args.seed", "5"]):
        cli = instantiate([*args, *extra])
        seeds[" ".join(extra)] = (cli.model.hparams.seed, cli.datamodule.hparams.seed,
                                  torch.randn(4, generator=cli.model._generator("noise", 0)))
    assert [v[:2] for v in seeds.values()] == [(0, 0), (3, 3), (5, 3)]
    first, second, _ = seeds.values()
    assert not torch.equal(first[2], second[2])


def test_concept_folder_and_dreambooth_subject_together_are_refused(workdir, monkeypatch, capsys):
    """Issue 15 #1: --data.concept_dir on top of a DreamBooth data config trained the DreamBooth
    images; now one message naming the fix, before any model loads."""
    import lightning_modules.base
    from train import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(lightning_modules.base, "load_components", no_loading)
    args = ["fit", *layered(ROOT / "configs" / "methods" / "lora.yaml", ROOT / "configs" / "data" / "dreambooth_dog.yaml"),
            *CPU, "--data.concept_dir", "my_concept", "--data.superclass", "cat"]
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, args, prog="train.py")
    assert exit_info.value.code == 2
    err = error_message(capsys.readouterr().err)
    assert "concept_dir: my_concept" in err and "subject 'dog'" in err and "fix:" in err and "--data.subject null" in err
    # the fix it names works: the folder alone trains on the folder
    cli = instantiate([*layered(ROOT / "configs" / "methods" / "lora.yaml", ROOT / "configs" / "data" / "dreambooth_dog.yaml"),
                       *CPU, "--data.concept_dir", "my_concept", "--data.superclass", "cat", "--data.subject", "null",
                       "--data.dreambooth_root", "null"])
    assert Path(cli.datamodule.concept_dir).name == "my_concept" and cli.model.superclass == "cat"


@pytest.mark.parametrize("edit, named", [
    (("- {guidance_interval: [0, 25]}", "- {guidance_interval: [0, 99]}"), "choose.final_concept candidate"),
    (("name: final_concept, guidance: 3.0}", "name: final_concept, guidance: 3.0, t_sw: 4}"), "unknown setting(s) t_sw"),
])
def test_a_bad_callback_setting_is_one_message_before_training(tmp_path, monkeypatch, capsys, edit, named):
    """A mistake in a callback's settings (the quickstart's final score: a choose candidate
    past num_steps, a setting the sampler does not take) is train.py's one message and exit
    status 2, not jsonargparse's traceback; no run folder is made."""
    from train import main

    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    assert edit[0] in text
    (tmp_path / "bad.yaml").write_text(text.replace(edit[0], edit[1]))
    monkeypatch.chdir(ROOT)  # the config's miniworld/pretrained/... paths
    args = ["fit", "--config", str(tmp_path / "bad.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, args, prog="train.py")
    assert exit_info.value.code == 2
    assert named in error_message(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# -- outputs follow the run; another run's artifact is refused ---------------------------------

#: a short CPU run of a layered config on the tiny preset
SHORT = [*CPU, "--model.init_args.pretrained_model", "tiny", "--model.init_args.frozen_dtype", "fp32",
         "--data.concept_dir", "demo", "--data.superclass", "null", "--data.resolution", "32", "--data.repeats", "2",
         "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def train(method: str, root: Path, *extra: str, capsys=None) -> int:
    from train import main

    args = ["fit", *layered(ROOT / "configs" / "methods" / f"{method}.yaml", relative=False), *SHORT,
            "--trainer.default_root_dir", str(root), *extra]
    try:
        run_command(main, args, prog="train.py")
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def error_message(stderr: str) -> str:
    """train.py's one message (in-process, stderr may also hold logging noise of earlier tests)."""
    assert "train.py: error:" in stderr, stderr
    message = stderr[stderr.index("train.py: error:"):].strip()
    assert "Traceback" not in message and len(message.splitlines()) <= 3, message
    return message


def manifest(root: Path) -> dict:
    return json.loads((root / "artifact" / "personalize.json").read_text())


def test_outputs_follow_default_root_dir(tmp_path, monkeypatch):
    """Issue 15 #7: checkpoints and the artifact go under --trainer.default_root_dir, not a
    folder named in a config; the artifact records the run that made it."""
    monkeypatch.chdir(tmp_path)
    assert train("textual_inversion", tmp_path / "outputs" / "other") == 0
    other = tmp_path / "outputs" / "other"
    assert (other / "checkpoints" / "last.ckpt").is_file()
    assert manifest(other)["method"] == "lightning_modules.textual_inversion.TextualInversion"
    run = manifest(other)["run"]
    assert run["pretrained_model"] == "tiny" and run["placeholder"] == "<concept>" and len(run["concept"]) == 16
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["other"]  # nothing in outputs/textual_inversion
    assert (other / "config.yaml").is_file()


def test_another_runs_artifact_is_refused_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train("textual_inversion", root) == 0
    # the run's run.json is written beside the checkpoints once training starts, so Lightning
    # does not call a fresh run's checkpoint folder "not empty"
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    first = manifest(root)
    weights = (root / "artifact" / "learned_embeds.safetensors").read_bytes()
    ckpt = (root / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()

    # another method into the same folder: refused before training, nothing replaced
    assert train("lora", root) == 2
    err = error_message(capsys.readouterr().err)
    assert "holds the artifact of another run" in err and "--overwrite_artifact true" in err, err
    assert "--trainer.default_root_dir" in err
    assert manifest(root) == first and (root / "artifact" / "learned_embeds.safetensors").read_bytes() == weights
    assert (root / "checkpoints" / "last.ckpt").read_bytes() == ckpt  # refused before any checkpoint was written

    # another concept (same method) is another run too
    assert train("textual_inversion", root, "--data.concept_dir", "miniworld:green_dotted_cube") == 2
    assert "other concept images" in error_message(capsys.readouterr().err)

    # the same run again replaces its own artifact
    assert train("textual_inversion", root, "--model.init_args.learning_rate", "0.5") == 0
    assert (root / "artifact" / "learned_embeds.safetensors").read_bytes() != weights
    assert manifest(root)["run"] == first["run"]

    # a run killed before its artifact was written keeps its checkpoints: another run's
    # last.ckpt would replace them (run.json beside them names the run)
    assert json.loads((root / "checkpoints" / "run.json").read_text()) == first["run"]
    shutil.move(root / "artifact", tmp_path / "artifact_aside")
    ckpt = (root / "checkpoints" / "last.ckpt").read_bytes()
    assert train("lora", root) == 2
    assert "holds the checkpoints of another run" in error_message(capsys.readouterr().err)
    assert (root / "checkpoints" / "last.ckpt").read_bytes() == ckpt
    shutil.move(tmp_path / "artifact_aside", root / "artifact")

    # deliberately: --overwrite_artifact true
    assert train("lora", root, "--overwrite_artifact", "true") == 0
    assert json.loads((root / "checkpoints" / "run.json").read_text())["method"].endswith(".LoRA")
    assert manifest(root)["method"] == "lightning_modules.peft_methods.LoRA" or manifest(root)["method"].endswith(".LoRA")
    assert not (root / "artifact" / "learned_embeds.safetensors").exists()


def test_a_folder_that_is_not_an_artifact_is_never_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    (root / "artifact").mkdir(parents=True)
    (root / "artifact" / "notes.txt").write_text("mine")
    assert train("textual_inversion", root, "--overwrite_artifact", "true") == 2
    assert "holds no artifact" in error_message(capsys.readouterr().err)
    assert (root / "artifact" / "notes.txt").read_text() == "mine"


def test_appending_sampler_validation_renders_the_grid_once(workdir, monkeypatch):
    """README/base.yaml: --trainer.callbacks+=callbacks.SamplerValidation appends to base.yaml's
    list; ImageGridLogger then hands val/images to SamplerValidation's concept grid (one
    render per validation), as configs/quickstart.yaml does with grid_aliases."""
    monkeypatch.chdir(workdir)
    cli = instantiate([*layered(ROOT / "configs" / "methods" / "dreambooth.yaml", ROOT / "configs" / "data" / "folder.yaml"),
                       *CPU, "--trainer.callbacks+=callbacks.SamplerValidation",
                       "--trainer.callbacks.clip=tiny", "--trainer.callbacks.dino=tiny"])
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("ImageGridLogger") == 1 and names.count("SamplerValidation") == 1, names
    grid = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ImageGridLogger")
    validation = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SamplerValidation")
    grid.setup(cli.trainer, cli.model, "fit")  # as trainer.fit does
    assert grid.deferred_to == "concept" and validation.grid_aliases == {"concept": "val/images"}
    grid.teardown(cli.trainer, cli.model, "fit")
    assert validation.grid_aliases == {}


def test_train_hides_only_the_expected_lightning_warnings():
    """The three warnings every fit prints are hidden; any other warning still shows."""
    import warnings

    import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.quiet_expected_warnings()
        warnings.warn("Found 490 module(s) in eval mode at the start of training. This may lead to unexpected behavior")
        warnings.warn("You're using the WeightAveraging callback with a model that overrides the configure_model callback.")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.")
        warnings.warn("Found 3 module(s) in train mode")  # not one of them
        warnings.warn("Checkpoint directory x exists and is not empty.")
    assert [str(w.message) for w in caught] == ["Found 3 module(s) in train mode",
                                                "Checkpoint directory x exists and is not empty."]


def test_wandb_save_dir_exists_before_wandb_starts(tmp_path):
    """W&B warns "git root ... does not exist" when its folder is missing at init: train.py
    creates each W&B logger's save_dir once the model and data are built, and only those."""
    from jsonargparse import Namespace

    import train

    wandb_dir, csv_dir = tmp_path / "runs" / "a", tmp_path / "csv"
    config = Namespace(trainer=Namespace(logger=[
        Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(save_dir=str(wandb_dir))),
        Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=str(csv_dir))),
    ]))
    train.make_wandb_dirs(config)
    assert wandb_dir.is_dir() and not csv_dir.exists()
    train.make_wandb_dirs(Namespace(trainer=Namespace(logger=False)))  # no logger: nothing to do
