"""Every LightningCLI config in configs/ parses: ``train.py fit --config X --print_config``.

``--print_config`` resolves the whole run (class paths imported, arguments type-checked)
without instantiating anything, so configs that name a GPU, Stable Diffusion 2-base or a
user's folder parse here too. Flat configs of other tools (samplers, evaluation) are skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI_KEYS = {"model", "data", "trainer"}


def cli_configs() -> list[Path]:
    configs = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        content = yaml.safe_load(path.read_text()) or {}
        if isinstance(content, dict) and CLI_KEYS & set(content):
            configs.append(path)
    return configs


def test_every_method_has_a_config():
    names = {p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml")}
    assert {"dreambooth", "dreambooth_qkv", "textual_inversion", "custom_diffusion", "svdiff", "lora", "oft", "boft",
            "hifi_tuner"} <= names


@pytest.mark.parametrize("path", cli_configs(), ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses_with_print_config(path, capsys, monkeypatch):
    from train import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    declared = yaml.safe_load(path.read_text())
    if "model" in declared:
        assert printed["model"]["class_path"].endswith(declared["model"]["class_path"].rsplit(".", 1)[-1])
