"""Every LightningCLI config in configs/ parses: ``train.py fit --config X --print_config``.

``--print_config`` resolves the whole run (class paths imported, arguments type-checked)
without instantiating anything, so configs that name a GPU, Stable Diffusion 2-base or a
user's folder parse here too. Flat configs of other tools (samplers, evaluation) are skipped.
Method configs are overlays: each parses layered as the README runs it, on
``configs/base.yaml`` with a data config on top (``configs/data/*``, the base and the data
configs are parts of these compositions; tests/test_configs.py builds every method × data).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI_KEYS = {"model", "data", "trainer"}


BASE, DATA = ROOT / "configs" / "base.yaml", ROOT / "configs" / "data" / "dreambooth_dog.yaml"


def layers(path: Path) -> list[Path]:
    """The configs to give, in order, for ``path`` (a method config is an overlay)."""
    return [BASE, path, DATA] if path.parent.name == "methods" else [path]


def cli_configs() -> list[Path]:
    configs = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path == BASE or path.parent.name == "data":
            continue  # parts of the layered method configs
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
        main(["fit", *[a for c in layers(path) for a in ("--config", str(c))], "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    declared = yaml.safe_load(path.read_text())
    if "model" in declared:
        assert printed["model"]["class_path"].endswith(declared["model"]["class_path"].rsplit(".", 1)[-1])
    if path.parent.name == "methods":  # the data config decides the images, the method the rest
        assert printed["data"]["init_args"]["subject"] == "dog"
        assert printed["trainer"]["callbacks"] and printed["trainer"]["logger"]
        for key, value in (declared.get("data") or {}).get("init_args", {}).items():
            assert printed["data"]["init_args"][key] == value, key
