"""User mistakes through the real command lines: exit status != 0, one short message that
names the fix, no traceback (unless --debug / PERSONALIZE_DEBUG=1 asks for one).

Each subprocess costs seconds of imports, so the command lines run in-process through the
same ``run_command`` wrapper their ``__main__`` uses, and a few cases run as real
subprocesses to prove the wrapper is what the scripts run."""

from __future__ import annotations

import os
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
