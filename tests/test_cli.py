"""One command-line style (components/cli.py): every command's --print_config reads back
through --config to the same options, later --config files override earlier ones, and the
old dashed spellings give the same options as the canonical ones."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = str(ROOT / "configs" / "miniworld" / "study.yaml")


def printed_config(main, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_normalise_argv_rewrites_old_spellings_only():
    from jsonargparse import ArgumentParser

    from components.cli import normalise_argv

    parser = ArgumentParser()
    parser.add_argument("--num_images", type=int)
    parser.add_argument("--concepts", type=list)
    words = ["--num-images", "2", "--num-images=3", "--not-an-option", "x", "--concepts", "a-b", "--c-d", "--",
             "--num-images", "-1"]
    out = normalise_argv(words, parser, lists={"--concepts"})
    assert out == ["--num_images", "2", "--num_images=3", "--not-an-option", "x", "--concepts", '["a-b"]', "--c-d",
                   "--", "--num_images", "-1"]
    assert normalise_argv(["--concepts", "a", "b", "--num-images", "1"], parser, lists={"--concepts"}) == [
        "--concepts", '["a", "b"]', "--num_images", "1"]
    assert normalise_argv(["--old", "v"], parser, aliases={"--old": ["--num_images"]}) == ["--num_images", "v"]
    assert normalise_argv(["--no-x"], parser, aliases={"--no-x": ["--concepts", "[]"]}) == ["--concepts", "[]"]


# -- python -m miniworld.study ------------------------------------------------------------------


def test_study_print_config_round_trips_and_layers(tmp_path, capsys):
    from miniworld import study

    base = study.parse_options(["--config", STUDY])
    assert base.methods["lora"]["class_path"] == "lightning_modules.LoRA" and base.workers == 2
    printed = printed_config(study.main, ["--config", STUDY, "--out", "x", "--workers", "1"], capsys)
    (tmp_path / "printed.yaml").write_text(printed)
    again = study.parse_options(["--config", str(tmp_path / "printed.yaml")])
    assert asdict(again) == asdict(study.parse_options(["--config", STUDY, "--out", "x", "--workers", "1"]))
    assert again.workers == 1 and again.out == "x" and again.sweep == base.sweep
    # a later config overrides an earlier one, key by key; an option after both wins
    (tmp_path / "small.yaml").write_text("concepts: [green_dotted_cube]\nworkers: 3\n")
    layered = study.parse_options(["--config", STUDY, "--config", str(tmp_path / "small.yaml")])
    assert layered.concepts == ["green_dotted_cube"] and layered.workers == 3 and layered.methods == base.methods
    last = study.parse_options(["--config", STUDY, "--config", str(tmp_path / "small.yaml"), "--workers", "4"])
    assert last.workers == 4


def test_study_old_spellings_give_the_same_options():
    from miniworld import study

    old = study.parse_options(["--config", STUDY, "--methods", "dreambooth", "lora", "--concepts",
                               "orange_checkered_ball", "green_dotted_cube"])
    new = study.parse_options(["--config", STUDY, "--run_methods", '["dreambooth", "lora"]', "--concepts",
                               '["orange_checkered_ball", "green_dotted_cube"]'])
    assert asdict(old) == asdict(new)
    assert old.run_methods == ["dreambooth", "lora"] and old.concepts == ["orange_checkered_ball", "green_dotted_cube"]
    assert set(old.methods) == set(study.parse_options(["--config", STUDY]).methods)  # the definitions stay


def test_study_mistakes_are_one_message(tmp_path, capsys):
    from miniworld import study

    for argv, needle in [(["--config", STUDY, "--methods", "nope"], "Unknown method(s) ['nope']"),
                         (["--config", "{}"], "fix: give a study config")]:
        with pytest.raises(SystemExit) as exit_info:
            study.main([*argv, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
