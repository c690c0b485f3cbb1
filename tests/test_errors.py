"""User mistakes through the real command lines: exit status != 0, one short message that
names the fix, no traceback (unless --debug / PERSONALIZE_DEBUG=1 asks for one).

Each subprocess costs seconds of imports, so the command lines run in-process through the
same ``run_command`` wrapper their ``__main__`` uses, and a few cases run as real
subprocesses to prove the wrapper is what the scripts run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.errors import MissingFileError, UserError, find_user_error, run_command

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


def assert_short_error(stderr: str, *needles: str, max_lines: int = 4) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower() or line.startswith("  fix:")]
    assert lines, stderr
    message = "\n".join(stderr.splitlines()[-max_lines:])
    for needle in needles:
        assert needle in message, f"{needle!r} not in the last {max_lines} lines of:\n{stderr}"


def in_process(main, argv, capsys) -> str:
    """run ``main`` as its script does; the exit status must be 2; returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, argv, prog="cmd")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# -- the wrapper itself ---------------------------------------------------------------------


def test_user_error_is_one_message_and_a_bug_keeps_its_traceback(capsys, monkeypatch):
    monkeypatch.delenv("PERSONALIZE_DEBUG", raising=False)

    def fails(argv):
        raise UserError("--num-images is 0", fix="pass --num-images 1 or more")

    assert in_process(fails, [], capsys) == "cmd: error: --num-images is 0\n  fix: pass --num-images 1 or more\n"

    def wrapped(argv):  # as jsonargparse wraps an error raised while building the model
        try:
            raise MissingFileError("prompts.txt does not exist")
        except UserError as err:
            raise ValueError("Does not validate against any of the Union subtypes ...") from err

    assert in_process(wrapped, [], capsys) == "cmd: error: prompts.txt does not exist\n"

    def bug(argv):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        run_command(bug, [])
    with pytest.raises(UserError):  # --debug: the user error raises, with its traceback
        run_command(fails, ["--debug"])
    seen = []
    run_command(lambda argv: seen.append(argv), ["fit", "--debug", "--x", "1"])
    assert seen == [["fit", "--x", "1"]]  # the command never sees --debug
    monkeypatch.setenv("PERSONALIZE_DEBUG", "1")
    with pytest.raises(UserError):
        run_command(fails, [])


def test_error_types_stay_catchable_as_before():
    assert isinstance(MissingFileError("x"), FileNotFoundError) and isinstance(UserError("x"), ValueError)
    assert find_user_error(RuntimeError("no")) is None


# -- the real command lines, as subprocesses ---------------------------------------------------


def test_train_py_bad_data_is_one_message(tmp_path):
    args = ["fit", "--model", "lightning_modules.DreamBooth", "--model.pretrained_model", "tiny",
            "--data", "datamodules.concept.ConceptDataModule", "--data.concept_dir", "demo",
            "--data.resolution", "512", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    result = run_script("train.py", *args)
    assert result.returncode == 2
    assert_short_error(result.stderr, "smaller than the training resolution 512", "allow_upscale")


# -- user mistakes through each command's main, as its script runs it ----------------------

import json  # noqa: E402

import evaluate  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

SAMPLE = ["--superclass", "dog", "--sampler", "concept", "--set", "num_steps=2", "--prompts", "a {}", "--device", "cpu"]
TRAIN = ["fit", "--model", "lightning_modules.DreamBoothQKV", "--model.pretrained_model", "tiny",
         "--data", "datamodules.concept.ConceptDataModule", "--data.concept_dir", "demo", "--data.resolution", "32",
         "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.max_steps", "1"]
EVAL = ["--model", "tiny", "--concept-dir", "demo", "--clip", "tiny", "--no-dino", "--prompts", "object",
        "--num-prompts", "1", "--num-images", "1", "--sampler", "concept", "--num-steps", "2", "--device", "cpu"]


def broken_artifacts(root: Path) -> dict[str, Path]:
    """A TI artifact, then copies with a damaged manifest, a manifest of another version,
    and a truncated weights file."""
    from conftest import make
    from lightning_modules import TextualInversion

    good = make(TextualInversion, {"placeholder": "<x>"}).save_artifact(root / "good")
    out = {"good": good}
    for name in ("damaged", "foreign", "truncated"):
        folder = root / name
        shutil.copytree(good, folder)
        out[name] = folder
    (out["damaged"] / "personalize.json").write_text('{"method": "lightning_modules.TextualInv')
    manifest = json.loads((good / "personalize.json").read_text())
    manifest["init_args"]["train_text_encoder"] = True
    (out["foreign"] / "personalize.json").write_text(json.dumps(manifest))
    weights = out["truncated"] / "learned_embeds.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    return out


def test_sample_py_mistakes(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["--model", "tny", *SAMPLE, *out], ["'tny' does not exist", "tiny, tiny-v"]),
        (["--model", "tiny", *SAMPLE[:-4], "--prompts", str(tmp_path / "prompts.txt"), *SAMPLE[-2:], *out],
         ["prompts.txt: no such file"]),
        (["--model", "tiny", *SAMPLE, "--num-images", "0", *out], ["--num-images (0)"]),
        (["--model", "tiny", *SAMPLE[:5], "num_steps=5000", *SAMPLE[6:], *out], ["num_steps=5000", "1000 training"]),
        (["--artifact", str(tmp_path / "nowhere"), *SAMPLE, *out], ["does not exist"]),
    ]
    arts = broken_artifacts(tmp_path / "artifacts")
    cases += [
        (["--artifact", str(arts["damaged"]), *SAMPLE, *out], ["damaged/personalize.json is damaged", "export"]),
        (["--artifact", str(arts["foreign"]), *SAMPLE, *out], ["takes no argument train_text_encoder", "export"]),
        (["--artifact", str(arts["truncated"]), *SAMPLE, *out], ["truncated is damaged or incomplete", "export"]),
    ]
    for argv, needles in cases:
        err = in_process(sample.main, argv, capsys)
        assert_short_error(err, *needles)
    # a hub id while offline: fails at once, saying how to use a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = in_process(sample.main, ["--model", "someone/no-such-model", *SAMPLE, *out], capsys)
    assert_short_error(err, "not in the local Hugging Face cache", "HF_HUB_OFFLINE", "local diffusers pipeline folder")
    assert not (tmp_path / "out").exists()  # nothing written by a failed command


def test_train_py_mistakes(tmp_path, capsys):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    root = ["--trainer.default_root_dir", str(tmp_path)]
    cases = [
        (["fit", "--model", "lightning_modules.Dreambooth", *TRAIN[3:]], ["not a fine-tuning method",
                                                                          "lightning_modules.DreamBooth,"]),
        ([*TRAIN, "--trainer.max_steps", "0"], ["max_steps 0 trains nothing"]),
        ([*TRAIN, "--trainer.max_epochs", "0"], ["max_epochs 0 trains nothing"]),
        ([*TRAIN, "--data.repeats", "0"], ["data.repeats is 0"]),
        ([*TRAIN, "--model.learning_rate", "-1"], ["learning_rate is -1", "cannot be negative"]),
        ([*TRAIN, "--model.mask_dilation", "2"], ["mask_dilation is 2 but model.masked_loss is off",
                                                   "model.masked_loss: true"]),
        ([*TRAIN, "--model.pretrained_model", "tny"], ["'tny' does not exist"]),
        ([*TRAIN, "--ckpt_path", str(empty)], ["empty.ckpt is empty or truncated", "earlier checkpoint"]),
    ]
    for argv, needles in cases:
        err = in_process(train.main, argv + root, capsys)
        assert_short_error(err, *needles)
    assert not any(tmp_path.rglob("*.safetensors"))  # no artifact, no training


def test_evaluate_py_mistakes(tmp_path, capsys):
    out = ["--output", str(tmp_path / "eval")]
    for argv, needles in [
        ([*EVAL, "--num-images", "0", *out], ["num_images is 0", "--num-images 1"]),
        (["--model", "tny", *EVAL[2:], *out], ["'tny' does not exist"]),
        ([*EVAL, "--num-steps", "5000", *out], ["num_steps=5000", "1000 training"]),
    ]:
        err = in_process(evaluate.main, argv, capsys)
        assert_short_error(err, *needles)


def test_placeholder_equal_to_superclass_warns():
    from datamodules.concept import ConceptDataModule

    with pytest.warns(UserWarning, match="placeholder 'ball' is the superclass word"):
        ConceptDataModule(concept_dir="demo", placeholder="ball", superclass="ball", resolution=32)


def test_sample_py_subprocess_is_one_short_message(tmp_path):
    result = run_script("sample.py", "--model", "tny", *SAMPLE, "--out", str(tmp_path))
    assert result.returncode == 2
    assert_short_error(result.stderr, "'tny' does not exist", "fix:")
