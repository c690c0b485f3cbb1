"""One command-line style (components/cli.py): every command's --print_config reads back
through --config to the same options, later --config files override earlier ones, and the
old dashed spellings give the same options as the canonical ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

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


def test_list_options_finds_every_spelling_of_a_list_field():
    from components.cli import list_options

    @dataclass
    class Options:  # the annotations are strings here (future import), resolved from this module
        a: Optional[list[str]] = None
        b: list[int] = field(default_factory=list)
        c: List[str] | None = None
        d: str | None = None
        e: dict = field(default_factory=dict)
        f: Optional[str] = None

    assert list_options(Options) == {"--a", "--b", "--c"}


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


# -- sample.py and evaluate.py -------------------------------------------------------------------

MASKED = str(ROOT / "configs" / "samplers" / "masked.yaml")
EVAL_QUICK = str(ROOT / "configs" / "eval" / "quickstart.yaml")


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_print_config_round_trips_through_config(command, tmp_path, capsys):
    import evaluate
    import sample

    if command == "sample":
        main, parse = sample.main, sample.parse_options
        argv = ["--model", "tiny", "--superclass", "dog", "--sampler_config", MASKED, "--settings.q", "0.5",
                "--prompts", "a {} on the beach", "a red {}", "--num_images", "2", "--compile", "--out", "x"]
    else:
        main, parse = evaluate.main, evaluate.parse_args
        argv = ["--config", EVAL_QUICK, "--model", "tiny", "--sampler", "mixed", "--settings.guidance_concept", "2",
                "--num_steps", "3", "--dino", "null", "--output", "o"]
    (tmp_path / "printed.yaml").write_text(printed_config(main, argv, capsys))
    again = parse(["--config", str(tmp_path / "printed.yaml")])
    assert asdict(again) == asdict(parse(argv))
    if command == "sample":
        assert again.settings == {"q": 0.5} and again.prompts == ["a {} on the beach", "a red {}"]
        assert again.compile == "default" and again.num_images == 2
    else:
        assert again.settings == {"guidance_concept": 2} and again.dino is None and again.concept_dir == "demo"


def test_layered_configs_override_earlier_ones(tmp_path):
    import evaluate
    import sample

    (tmp_path / "a.yaml").write_text("model: tiny\nsuperclass: dog\nseed: 1\nsettings: {q: 0.5, t_sw: 2}\n"
                                     "prompts: ['a {}']\nout: a\n")
    (tmp_path / "b.yaml").write_text("seed: 2\nsettings: {q: 0.9}\nout: b\n")
    layered = sample.parse_options(["--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"),
                                    "--out", "c"])
    assert (layered.model, layered.superclass, layered.seed, layered.out) == ("tiny", "dog", 2, "c")
    assert layered.settings == {"q": 0.9}  # a later file's value replaces the whole value, as in train.py
    one_key = sample.parse_options(["--config", str(tmp_path / "a.yaml"), "--settings.q", "0.9"])
    assert one_key.settings == {"q": 0.9, "t_sw": 2}  # --settings.KEY (--set KEY=VALUE) changes one key
    (tmp_path / "e.yaml").write_text("num_images: 3\nclip: tiny\n")
    cfg = evaluate.build_config(evaluate.parse_args(["--config", EVAL_QUICK, "--config", str(tmp_path / "e.yaml")]))
    assert cfg.num_images == 3 and cfg.clip == "tiny" and cfg.concept_dir == "demo"  # quickstart's, kept


def test_old_dashed_spellings_give_the_same_options(tmp_path):
    import evaluate
    import sample

    old = sample.parse_options(["--model", "tiny", "--superclass", "dog", "--sampler-config", MASKED, "--set", "q=0.5",
                                "--set", "t_sw=[2]", "--dreambooth-prompts", "live", "--num-images", "2",
                                "--batch-size", "3", "--compile", "--out", "x"])
    new = sample.parse_options(["--model", "tiny", "--superclass", "dog", "--sampler_config", MASKED, "--settings.q",
                                "0.5", "--settings.t_sw", "[2]", "--dreambooth_prompts", "live", "--num_images", "2",
                                "--batch_size", "3", "--compile", "default", "--out", "x"])
    assert asdict(old) == asdict(new) and old.settings == {"q": 0.5, "t_sw": [2]} and old.batch_size == 3
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("sweep:\n  - sampler: concept\n    grid: {guidance: [3, 7]}\n")
    old = evaluate.parse_args(["--config", EVAL_QUICK, "--concept-dir", "demo", "--num-prompts", "2", "--no-dino",
                               "--no-share", "--no-grids", "--log-grids", "--sweep", str(sweep), "--num-steps", "3",
                               "--clip-t-text", "remove", "--unet-batch", "8"])
    new = evaluate.parse_args(["--config", EVAL_QUICK, "--concept_dir", "demo", "--num_prompts", "2", "--dino", "null",
                               "--share", "false", "--save_grids", "false", "--log_grids", "true", "--sweep",
                               '[{sampler: concept, grid: {guidance: [3, 7]}}]', "--num_steps", "3",
                               "--clip_t_text", "remove", "--unet_batch", "8"])
    assert asdict(old) == asdict(new)
    cfg = evaluate.build_config(old)
    assert (cfg.dino, cfg.share, cfg.save_grids, cfg.log_grids, cfg.unet_batch) == (None, False, False, True, 8)
    assert cfg.sweep == [{"sampler": "concept", "grid": {"guidance": [3, 7]}}] and cfg.defaults["num_steps"] == 3


# -- one sampler-spec parser ---------------------------------------------------------------------


def test_one_sampler_spec_parser_for_every_caller(monkeypatch):
    import evaluate
    import sample
    import samplers.registry as registry
    from callbacks.sampling import _build_entries
    from samplers import build_sampler, parse_sampler_spec, sampler_spec

    mixed = str(ROOT / "configs" / "samplers" / "mixed.yaml")
    by_name = parse_sampler_spec("mixed")
    by_yaml = parse_sampler_spec(mixed)
    by_mapping = parse_sampler_spec({"sampler": "mixed", "name": "m", **by_yaml[2]})
    assert by_name == ("mixed", "mixed", {}) and by_yaml[:2] == ("mixed", "mixed") and by_mapping[:2] == ("m", "mixed")
    assert by_mapping[2] == by_yaml[2]
    settings = build_sampler("mixed").settings()
    assert build_sampler(*by_yaml[1:2], **by_yaml[2]).settings() == settings  # the YAML holds the defaults
    assert sampler_spec("mixed") == ("mixed", {}) and sampler_spec(None, mixed) == ("mixed", by_yaml[2])
    assert sampler_spec(mixed, None, {"guidance_concept": 1}) == ("mixed", {**by_yaml[2], "guidance_concept": 1})
    with pytest.raises(ValueError, match="contradicts"):
        sampler_spec("concept", mixed)

    calls = []
    real = registry.parse_sampler_spec
    monkeypatch.setattr(registry, "parse_sampler_spec", lambda spec: calls.append(spec) or real(spec))
    assert sample.resolve_sampler(sample.parse_options(["--sampler", "mixed", "--settings.guidance_concept", "1"]))\
        .settings() == {**settings, "guidance_concept": 1}
    cfg = evaluate.build_config(evaluate.parse_args(["--config", EVAL_QUICK, "--sampler", mixed]))
    assert cfg.sweep == [{"sampler": "mixed", "settings": by_yaml[2]}]
    assert [e.sampler.settings() for e in _build_entries(["mixed"])] == [settings]
    assert calls == ["mixed", mixed, "mixed"]  # sample.py, evaluate.py, the training callbacks


# -- one run-identity check (components/runs.py) for its three users ------------------------------


def test_one_identity_check_refuses_another_run_for_each_user(tmp_path, capsys):
    import json

    import sample
    from callbacks.export import checkpoint_conflict
    from components.errors import UserError
    from components.runs import check_identity, identity_changes, recorded_identity, write_identity
    from evaluation.results import ResultStore
    from evaluation.run import EvalConfig, _check_identity

    assert identity_changes(None, {"a": 1}) == ""  # nothing recorded: free
    assert identity_changes({"a": [1, 2]}, {"a": (1, 2)}) == ""  # compared as JSON (as read back)
    assert identity_changes({"a": 1, "concept": "x"}, {"a": 2, "concept": "y"}) == \
        "a 1 there, 2 here, other concept images"
    write_identity(tmp_path / "f", {"a": 1})
    assert recorded_identity(tmp_path / "f") == {"a": 1}
    check_identity(tmp_path / "f", {"a": 2}, in_use=False, problem="{changes}", fix="")  # no outputs: free
    with pytest.raises(UserError, match="a 1 there, 2 here"):
        check_identity(tmp_path / "f", {"a": 2}, in_use=True, problem="{changes}", fix="")
    (tmp_path / "f" / "run.json").write_text("{damaged")
    assert recorded_identity(tmp_path / "f") == {}  # another run's

    # sample.py: its --out
    args = ["--model", "tiny", "--superclass", "dog", "--sampler", "concept", "--set", "num_steps=1", "--prompts",
            "a {}", "--num-images", "1", "--device", "cpu", "--out", str(tmp_path / "s")]
    sample.main(args + ["--seed", "3"])
    with pytest.raises(SystemExit) as exit_info:
        sample.main(args + ["--seed", "4"])
    assert exit_info.value.code == 2 and "(seed 3 there, 4 here)" in capsys.readouterr().err
    # evaluation: its output folder, once it holds results
    out = tmp_path / "e"
    _check_identity(out, EvalConfig(model="tiny", concept_dir="demo", seed=0))
    ResultStore(out).append({"subject": "demo", "sampler": "concept", "curve": "", "setting": "", "clip_i": 0.5,
                             "clip_t": 0.25, "dino": 0.1, "unet_evals_per_image": 2, "max_unet_batch": 2,
                             "num_images": 1, "seconds": 0.1, "settings": "{}", "key": "k"})
    with pytest.raises(UserError, match="another evaluation \\(seed 0 there, 1 here\\)"):
        _check_identity(out, EvalConfig(model="tiny", concept_dir="demo", seed=1))
    # training: its checkpoint folder, once it holds a checkpoint
    ckpt = tmp_path / "checkpoints"
    identity = {"method": "lightning_modules.LoRA", "pretrained_model": "tiny", "placeholder": "sks",
                "superclass": "dog", "concept": "abc"}
    write_identity(ckpt, identity)
    assert checkpoint_conflict(ckpt, {**identity, "method": "lightning_modules.SVDiff"}) is None  # no .ckpt yet
    (ckpt / "last.ckpt").write_bytes(b"x")
    assert checkpoint_conflict(ckpt, identity) is None
    problem, _, _ = checkpoint_conflict(ckpt, {**identity, "method": "lightning_modules.SVDiff", "concept": "d"})
    assert "method 'lightning_modules.LoRA' there, 'lightning_modules.SVDiff' here, other concept images" in problem
    assert json.loads((ckpt / "run.json").read_text()) == identity


# -- python -m miniworld, python -m miniworld.quality ---------------------------------------------


def test_miniworld_commands_keep_their_spellings(tmp_path, capsys):
    from miniworld import __main__ as world
    from miniworld import quality

    command, old = world.parse(["write-concept", "orange_checkered_ball", "f", "--num-images", "2", "--context", "prop"])
    assert command == "write-concept" and (old.name, old.folder, old.num_images, old.context) == (
        "orange_checkered_ball", "f", 2, "prop")
    assert world.parse(["write-concept", "orange_checkered_ball", "f", "--num_images", "2", "--context", "prop"]) == \
        (command, old)
    assert world.parse(["train-vae", "--out", "v", "--steps", "3"]) == ("train-vae", world.Train(out="v", steps=3))
    with pytest.raises(SystemExit) as exit_info:  # a bad choice: exit 2 before any work
        world.parse(["write-concept", "x", "f", "--context", "nowhere"])
    assert exit_info.value.code == 2 and "context" in capsys.readouterr().err

    old = quality.parse_options(["--num-prompts", "2", "--no-prompt-set", "--num-held-out", "8", "--clip", ""])
    new = quality.parse_options(["--num_prompts", "2", "--prompt_set", "false", "--num_held_out", "8", "--clip", ""])
    assert asdict(old) == asdict(new) and old.prompt_set is False and old.clip == ""
    assert quality.parse_options(["--prompt-set"]).prompt_set is True
    printed = printed_config(quality.main, ["--num-prompts", "2", "--no-prompt-set"], capsys)
    (tmp_path / "q.yaml").write_text(printed)
    assert asdict(quality.parse_options(["--config", str(tmp_path / "q.yaml")])) == asdict(
        quality.parse_options(["--num-prompts", "2", "--no-prompt-set"]))
