"""Every ``python ...`` command in README.md's code blocks runs as written, shortened.

The commands are read from the README itself (continuation lines joined, comments
dropped). Each one is either in :data:`RUN` (run here, in README order, with the
substitutions of :data:`SUBSTITUTIONS` and the shortening arguments appended after the
README's own, so they override them; then its output files are checked) or in
:data:`SKIP` with the reason it cannot run on a CPU test machine (GPUs, SLURM, real
weights, hours). A README command in neither, or a listed command no longer in the
README, fails :func:`test_every_readme_command_is_run_or_skipped`.

How a README command is shortened:

- hub ids become the tiny preset of their family (``SUBSTITUTIONS``), and a method
  config's own base model is replaced the same way (``--model.init_args.pretrained_model``);
- ``/data/dreambooth`` becomes a stand-in DreamBooth layout at ``../shared/dreambooth``
  (subjects ``dog`` and ``dog6``, two 64 px images each), and ``my_cat/`` and
  ``prompts.txt`` exist in the folder the commands run from;
- training: 2 steps on the CPU in fp32 at 32 px, no validation, no W&B
  (:data:`TRAIN_SHORT`); sampling: 1 image per prompt, 2 DDIM steps.

The quickstart (the README's first command) runs as a real subprocess, with W&B offline,
as a new user would run it; the other commands run in-process through the same
``run_command`` wrapper their scripts use (imports are paid once).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import repo_workdir

ROOT = Path(__file__).resolve().parents[1]

#: text replaced in a README command before it runs (real weights -> tiny presets, paths)
SUBSTITUTIONS = [
    ("stabilityai/stable-diffusion-2-base", "tiny"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tiny-sdxl"),
    (" /data/dreambooth", " ../shared/dreambooth"),
]
#: appended to every train.py fit command (later arguments override the README's)
TRAIN_SHORT = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
               "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--model.init_args.frozen_dtype", "fp32", "--data.init_args.resolution", "32",
               "--data.init_args.repeats", "1"]
SAMPLE_SHORT = ["--num-images", "1", "--set", "num_steps=2"]
#: the quickstart config on another concept: its final score (the last callback, which a
#: list option's init_args set) reads the first prompt only
FINAL_SHORT = [*TRAIN_SHORT, "--trainer.callbacks.init_args.num_prompts", "1"]


@dataclass
class Run:
    extra: list[str] = field(default_factory=list)  # appended after the README's arguments
    files: list[str] = field(default_factory=list)  # must exist afterwards (relative to the run folder)
    stdout: str = ""  # must be printed
    subprocess: bool = False
    needs: str | None = None  # another README command whose outputs this one reads


QUICKSTART = ("bash scripts/setup.sh && WANDB_MODE=offline .venv/bin/python train.py fit "
              "--config configs/quickstart.yaml")
SVDIFF_SDXL = ("python train.py fit --config configs/base.yaml --config configs/methods/svdiff_sdxl.yaml "
               "--config configs/data/dreambooth_dog.yaml --data.init_args.subject dog6")
TRAINED = ["artifact/personalize.json", "checkpoints/last.ckpt"]
PYRAMID = ("python train.py fit --config configs/quickstart.yaml --data.init_args.concept_dir "
           "miniworld:pink_dotted_pyramid:scene:20 --trainer.default_root_dir outputs/pyramid")


def trained(root: str) -> list[str]:
    return [f"{root}/{f}" for f in TRAINED]


RUN: dict[str, Run] = {
    # 1 epoch of 2 steps, no validation: the quickstart's checkpoints and grids are
    # tests/test_quickstart.py's (4 shortened epochs)
    QUICKSTART: Run(extra=["--trainer.max_epochs", "1", "--data.init_args.repeats", "1",
                           "--trainer.num_sanity_val_steps", "0"], subprocess=True,
                    files=["outputs/quickstart/artifact/personalize.json", "outputs/quickstart/config.yaml",
                           "outputs/quickstart/wandb"]),
    # the quickstart on another concept: the final score (the judge's, for the star) still prints
    "python train.py fit --config configs/quickstart.yaml --data.init_args.concept_dir miniworld:blue_striped_star:scene:20 "
    "--trainer.default_root_dir outputs/star": Run(extra=FINAL_SHORT, files=["outputs/star/artifact/personalize.json"],
                                                   stdout="final_concept"),
    # the pyramid, then the concept sampler guided over its first 25 steps only (50 steps kept:
    # the interval must fit them), scored by the judge
    PYRAMID: Run(extra=FINAL_SHORT, files=["outputs/pyramid/artifact/personalize.json"]),
    "python evaluate.py --artifact outputs/pyramid/artifact --concept_dir miniworld:pink_dotted_pyramid "
    "--sampler concept --settings.guidance 3 --settings.guidance_interval \"[0, 25]\" --num_images 2 "
    "--clip miniworld/pretrained/clip --dino miniworld/pretrained/dino --judge miniworld/pretrained/judge "
    "--output outputs/pyramid/interval": Run(extra=["--num_prompts", "1", "--num_images", "1"],
                                             files=["outputs/pyramid/interval/results.csv"], stdout="identity",
                                             needs=PYRAMID),
    "python train.py fit --help": Run(stdout="--overwrite_artifact"),
    "python train.py fit --config configs/base.yaml --config configs/methods/lora.yaml "
    "--config configs/data/dreambooth_dog.yaml": Run(extra=[*TRAIN_SHORT, "--model.init_args.pretrained_model", "tiny"],
                                                     files=trained("outputs/lora")),
    "python train.py fit --config configs/base.yaml --config configs/methods/dreambooth_qkv.yaml "
    "--config configs/data/dreambooth_dog.yaml --print_config": Run(stdout="lightning_modules.DreamBoothQKV"),
    "python train.py fit --config configs/base.yaml --config configs/methods/dreambooth_qkv.yaml "
    "--config configs/data/dreambooth_dog.yaml --model.init_args.pretrained_model stabilityai/stable-diffusion-2-base "
    "--data.dreambooth_root /data/dreambooth --data.subject dog6 --trainer.default_root_dir outputs/dog6":
        Run(extra=TRAIN_SHORT, files=trained("outputs/dog6")),
    "python train.py fit --config configs/base.yaml --config configs/methods/textual_inversion.yaml "
    "--config configs/data/folder.yaml --data.concept_dir my_cat/ --data.superclass cat --data.placeholder \"<my-cat>\" "
    "--trainer.default_root_dir outputs/my_cat":
        Run(extra=[*TRAIN_SHORT, "--model.init_args.pretrained_model", "tiny"], files=trained("outputs/my_cat")),
    SVDIFF_SDXL: Run(extra=[*TRAIN_SHORT, "--model.init_args.pretrained_model", "tiny-sdxl"],
                     files=trained("outputs/svdiff_sdxl")),
    "python train.py fit --config configs/base.yaml --config configs/methods/dreambooth_pixart.yaml "
    "--config configs/data/dreambooth_dog.yaml --data.init_args.subject dog6":
        Run(extra=[*TRAIN_SHORT, "--model.init_args.pretrained_model", "tiny-pixart"],
            files=trained("outputs/dreambooth_pixart")),
    "python train.py fit --config configs/base.yaml --config configs/methods/lora.yaml "
    "--config configs/data/dreambooth_dog.yaml --trainer.default_root_dir outputs/lora_sdxl "
    "--model.init_args.pretrained_model stabilityai/stable-diffusion-xl-base-1.0 --data.init_args.resolution 1024":
        Run(extra=TRAIN_SHORT, files=trained("outputs/lora_sdxl")),
    "python sample.py --artifact outputs/svdiff_sdxl/artifact --sampler mixed --dreambooth-prompts live --out out/sdxl":
        Run(extra=SAMPLE_SHORT, files=["out/sdxl/manifest.jsonl", "out/sdxl/p024_i000.png"], needs=SVDIFF_SDXL),
    "python sample.py --artifact outputs/quickstart/artifact --sampler mixed --set guidance_concept=3.5 "
    "--set guidance_superclass=3.5 --dreambooth-prompts object --num-images 4 --seed 0 --out outputs/samples/mixed":
        Run(extra=SAMPLE_SHORT, files=["outputs/samples/mixed/manifest.jsonl", "outputs/samples/mixed/p024_i000.png"],
            needs=QUICKSTART),
    "python sample.py --artifact outputs/quickstart/artifact --sampler concept --settings.guidance 3 "
    "--settings.guidance_interval \"[0, 25]\" --prompts \"a {} on the beach\" --num_images 2 --out outputs/samples/interval":
        Run(extra=["--num_images", "1"], files=["outputs/samples/interval/p000_i000.png"], needs=QUICKSTART),
    # the sampler the quickstart's final score chose, as the sampler YAML it wrote
    "python sample.py --artifact outputs/quickstart/artifact --sampler_config outputs/quickstart/samplers/final_concept.yaml "
    "--prompts \"a {} on the beach\" --num_images 2 --out outputs/samples/chosen":
        Run(extra=["--num_images", "1"], files=["outputs/samples/chosen/p000_i000.png"], needs=QUICKSTART),
    "python sample.py --model stabilityai/stable-diffusion-2-base --superclass dog "
    "--sampler-config configs/samplers/photoswap.yaml --prompts prompts.txt --out out/":
        Run(extra=["--num-images", "1"], files=["out/manifest.jsonl", "out/p000_i000.png"]),
    "python sample.py --model stabilityai/stable-diffusion-2-base --superclass dog --sampler mixed "
    "--settings.guidance_concept 3.5 --prompts prompts.txt --out out/ --print_config":
        Run(stdout="guidance_concept: 3.5"),
}

GPU, SLURM = "needs GPUs", "needs a SLURM cluster"
SKIP: dict[str, str] = {
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q": "the test suite itself",
    "python train.py fit --config configs/base.yaml --config configs/methods/dreambooth.yaml "
    "--config configs/data/dreambooth_dog.yaml --trainer.devices 4 --trainer.strategy ddp":
        f"{GPU} (4); tests/test_ddp.py trains every method in a 2-process CPU DDP run",
    "srun python train.py fit --config configs/base.yaml --config configs/methods/dreambooth.yaml "
    "--config configs/data/dreambooth_dog.yaml --trainer.num_nodes 2 --trainer.devices 4 --trainer.strategy ddp":
        f"{SLURM} (2 nodes x 4 GPUs)",
    "python evaluate.py --config configs/eval/mixed_sweep.yaml --artifact 'outputs/{subject}/artifact'":
        "needs real CLIP and DINO weights and one trained artifact per DreamBooth subject (30); "
        "tests/test_evaluation.py runs evaluate.py on the tiny preset",
    "python evaluate.py --config configs/eval/sampling_study.yaml --artifact 'outputs/{subject}/artifact' --devices 4":
        f"{GPU} (4) and real CLIP/DINO weights and 30 artifacts",
    "python benchmarks/bench_sweep.py --device cuda --dtype bfloat16 --unet-batch 64 --num-prompts 25 --num-images 10 "
    "--config configs/eval/sampling_study.yaml --model <an SD folder>": f"{GPU} and an SD pipeline folder",
    "python benchmarks/bench_samplers.py --model sd2-base-random --device cuda --dtype bfloat16 --compile max-autotune "
    "--batch-size 32": GPU,
    "python benchmarks/bench_training.py --model sd2-base-random --device cuda --precision bf16-mixed": GPU,
    "python edit.py replace --image in.png --caption \"a red ball on the beach\" --word ball "
    "--artifact outputs/x/artifact --out out.png":
        "needs a trained artifact; tests/test_hifi_generation.py runs edit.py replace (and its refusals) in-process "
        "on a MiniWorld HiFi Tuner artifact",
    "python -m miniworld.study --config configs/miniworld/study.yaml --out outputs/miniworld_study":
        "45 fine-tunings and 1400 cells, about 2 hours on 2 cores; tests/test_miniworld_study.py runs a shortened study",
}

_PYTHON = re.compile(r"(?:^|[\s/])python3?(?:\s|$)")


def readme_commands(text: str | None = None) -> list[str]:
    """The README's shell lines that run Python, in order: fenced code blocks only,
    continuation lines joined, comments and whitespace runs dropped."""
    text = (ROOT / "README.md").read_text() if text is None else text
    commands, in_block, block = [], False, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if in_block:
                joined = "\n".join(block).replace("\\\n", " ")
                for cmd in joined.splitlines():
                    cmd = re.sub(r"\s+#.*$", "", cmd) if not cmd.lstrip().startswith("#") else ""
                    cmd = " ".join(cmd.split())
                    if cmd and _PYTHON.search(cmd):
                        commands.append(cmd)
            in_block, block = not in_block, []
        elif in_block:
            block.append(line)
    return commands


def test_every_readme_command_is_run_or_skipped():
    commands = readme_commands()
    assert len(commands) >= 15  # the parser finds the README's commands
    assert commands[0] == QUICKSTART
    unlisted = [c for c in commands if c not in RUN and c not in SKIP]
    assert not unlisted, "README commands neither run nor skipped here (add them to RUN or SKIP):\n" + "\n".join(unlisted)
    stale = [c for c in [*RUN, *SKIP] if c not in commands]
    assert not stale, "listed commands no longer in the README:\n" + "\n".join(stale)
    assert not set(RUN) & set(SKIP)


def test_readme_commands_parse_as_shell():
    """Joined continuation lines and quotes make whole shell words (no stray backslash)."""
    for cmd in readme_commands():
        assert "\\" not in shlex.split(cmd), cmd


# -- running them ---------------------------------------------------------------------------------


def _concept(folder: Path, n: int = 2, size: int = 64) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        rgb = np.zeros((size, size, 3), np.uint8)
        rgb[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 40 * (i + 1), 60)
        Image.fromarray(rgb).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the README's commands run from: the repository's configs/ and miniworld/
    (the MiniWorld model), a stand-in DreamBooth layout at ../shared/dreambooth, my_cat/ and
    prompts.txt; outputs land here."""
    cwd = repo_workdir(tmp_path_factory.mktemp("readme"), {"dog": "dog", "dog6": "dog"}, _concept)
    _concept(cwd / "my_cat")
    (cwd / "prompts.txt").write_text("a {} on the beach\n")
    return cwd


_ran: set[str] = set()


def argv_of(command: str) -> tuple[str, list[str]]:
    """(script, arguments) of a README command after the substitutions."""
    for old, new in SUBSTITUTIONS:
        command = command.replace(old, new)
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if re.fullmatch(r"(?:.*/)?python3?", w))
    return words[start + 1], words[start + 2:]


def run_readme_command(command: str, workdir: Path, capsys) -> str:
    """Run one README command (and, first, the one whose outputs it reads); its stdout."""
    spec = RUN[command]
    if spec.needs and spec.needs not in _ran:
        run_readme_command(spec.needs, workdir, capsys)
    script, args = argv_of(command)
    args = [*args, *spec.extra]
    if spec.subprocess:
        # a W&B run started earlier in this process leaves service variables in the environment
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k == "WANDB_SILENT"}
        env.update(WANDB_MODE="offline", PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = proc.stdout
    else:
        import importlib

        from components.errors import run_command

        main = importlib.import_module(Path(script).stem).main
        capsys.readouterr()
        try:
            run_command(main, args, prog=script)
        except SystemExit as exit_info:  # --help, --print_config
            assert exit_info.code in (0, None), capsys.readouterr().err[-4000:]
        out = capsys.readouterr().out
    _ran.add(command)
    missing = [f for f in spec.files if not (workdir / f).exists()]
    assert not missing, f"{command}\n left no {missing}"
    assert spec.stdout in out, out[-2000:]
    return out


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: " ".join(c.split()[:8])[:90])
def test_readme_command_runs(command, workdir, monkeypatch, capsys):
    if command in SKIP:
        pytest.skip(SKIP[command])
    if command not in RUN:
        pytest.fail("not listed in RUN or SKIP (see test_every_readme_command_is_run_or_skipped)")
    monkeypatch.chdir(workdir)
    if command not in _ran:
        run_readme_command(command, workdir, capsys)
