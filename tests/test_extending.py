"""Issue 9's "done means": adding a sampler is one new file in samplers/ (its @register is
enough), adding a method is one new file in lightning_modules/ plus a method overlay config.

Each test copies the package as it is in the repository into a temporary folder, adds the
one new file there, and runs a fresh interpreter with that copy first on the path: if the
package stopped discovering its modules, the new sampler / method would not be found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, pkgs: Path, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkgs), str(ROOT)]), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def copy_package(name: str, pkgs: Path) -> Path:
    return Path(shutil.copytree(ROOT / name, pkgs / name, ignore=shutil.ignore_patterns("__pycache__")))


def test_a_sampler_is_one_new_file(tmp_path):
    pkgs = tmp_path / "pkgs"
    copy_package("samplers", pkgs)
    (pkgs / "samplers" / "echo.py").write_text(textwrap.dedent('''
        from samplers.guidance import ConceptSampler
        from samplers.registry import register


        @register
        class EchoSampler(ConceptSampler):
            """The concept sampler under another name."""
            name = "echo"
    '''))
    out = run_python(f'''
        import samplers, sample, evaluate
        from callbacks import ImageGridLogger, SamplerValidation
        assert samplers.__file__.startswith({str(pkgs)!r}), samplers.__file__
        assert "echo" in samplers.SAMPLERS and "echo" in samplers.model_only_samplers()
        assert list(samplers.SAMPLERS)[-1] == "echo"  # after the built-in samplers, which __init__ imports first
        options = sample.parse_options(["--model", "tiny", "--sampler", "echo", "--settings.num_steps", "3", "--out", "o"])
        print("sample", type(sample.resolve_sampler(options)).__name__)
        config = evaluate.build_config(evaluate.parse_args(["--model", "tiny", "--sampler", "echo", "--out", "o"]))
        from evaluation.sweep import expand_sweep
        print("evaluate", *set(type(p.build()).__name__ for p in expand_sweep(config.sweep, config.defaults)))
        print("validation", type(SamplerValidation(samplers=["echo"], clip="tiny", dino=None).entries[0].sampler).__name__)
        print("grid", type(ImageGridLogger(sampler="echo").sampler).__name__)
    ''', pkgs, tmp_path)
    print(out)
    for command in ("sample", "evaluate", "validation", "grid"):
        assert f"{command} EchoSampler" in out, out


def test_a_method_is_one_new_file_and_an_overlay_config(tmp_path):
    """lightning_modules/my_method.py + a method overlay naming ``lightning_modules.MyMethod``,
    layered as the README layers every method (base + method + data): train.py's CLI builds
    it, its artifact names it and loads back as it, and the unknown-method message lists it."""
    pkgs = tmp_path / "pkgs"
    copy_package("lightning_modules", pkgs)
    (pkgs / "lightning_modules" / "my_method.py").write_text(textwrap.dedent('''
        from lightning_modules.dreambooth import DreamBooth


        class MyMethod(DreamBooth):
            """DreamBooth with one more argument of its own."""

            def __init__(self, my_scale: float = 1.0, **kwargs):
                super().__init__(**kwargs)
                self.save_hyperparameters("my_scale")
    '''))
    overlay = tmp_path / "my_method.yaml"
    overlay.write_text(textwrap.dedent('''
        model:
          class_path: lightning_modules.MyMethod
          init_args:
            pretrained_model: tiny
            learning_rate: 1.0e-5
            my_scale: 2.5
        trainer:
          max_steps: 2
          default_root_dir: outputs/my_method
    '''))
    cwd = tmp_path / "repo"
    cwd.mkdir()
    (cwd / "configs").symlink_to(ROOT / "configs")
    concept = cwd / "my_concept"
    concept.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 120, 200)).save(concept / f"{i:02d}.png")
    out = run_python(f'''
        import lightning_modules
        from lightning_modules.base import method_class, load_personalized, read_artifact_manifest
        from components.errors import UserError
        from train import PersonalizeCLI

        assert lightning_modules.__file__.startswith({str(pkgs)!r}), lightning_modules.__file__
        args = ["--config", "configs/base.yaml", "--config", {str(overlay)!r}, "--config", "configs/data/folder.yaml",
                "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.resolution", "32"]
        cli = PersonalizeCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, run=False)
        model = cli.model
        model.configure_model()
        print("built", type(model).__module__, type(model).__name__, model.hparams.my_scale, model.superclass)
        folder = model.save_artifact("artifact")
        manifest = read_artifact_manifest(folder)
        print("manifest", manifest["method"], manifest["init_args"]["my_scale"])
        print("loaded", type(load_personalized(artifact=folder)).__name__)
        try:
            method_class("lightning_modules.NoSuchMethod")
        except UserError as err:
            print("listed", "lightning_modules.MyMethod" in str(err) + str(err.fix))
    ''', pkgs, cwd)
    print(out)
    assert "built lightning_modules.my_method MyMethod 2.5 dog" in out
    assert "manifest lightning_modules.my_method.MyMethod 2.5" in out
    assert "loaded MyMethod" in out and "listed True" in out
