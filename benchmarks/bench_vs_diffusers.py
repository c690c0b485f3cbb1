"""Training speed against diffusers' own example scripts, same model, images, batch and precision.

    python benchmarks/bench_vs_diffusers.py --diffusers ~/src/diffusers
    python benchmarks/bench_vs_diffusers.py --diffusers ~/src/diffusers --methods lora --repeats 5 --steps 60

Nothing is fetched: ``--diffusers`` is the path to a checkout of huggingface/diffusers
(its ``examples/`` folder is what runs; the installed ``diffusers`` package is the
library both sides use). The example scripts import ``torchvision.transforms``; where
torchvision cannot be installed next to the CPU torch (see the README), ``--torchvision
DIR`` puts a folder holding a transforms-only torchvision first on the scripts'
``PYTHONPATH``. To make one: ``pip download torchvision==0.29.1 --no-deps``, unzip the
wheel into DIR, and in ``DIR/torchvision/__init__.py`` delete the imports of
``extension`` and of the subpackages (compiled-op registrations), keeping the rest: the
example scripts use only ``torchvision.transforms``. The project itself never imports
torchvision.

Per method, interleaved over ``--repeats`` (the order alternates each repeat), each run
in a fresh process under ``benchmarks/steptimer.py``, which records when every optimizer
step ends:

- ``dreambooth``: ``examples/dreambooth/train_dreambooth.py`` (with
  ``--pre_compute_text_embeddings``, its fastest setting) vs ``lightning_modules.DreamBooth``;
- ``lora``: ``examples/dreambooth/train_dreambooth_lora.py`` (rank 4) vs ``lightning_modules.LoRA``;
- ``textual_inversion``: ``examples/textual_inversion/textual_inversion.py`` vs
  ``lightning_modules.TextualInversion`` (``train.py fit`` with a generated config).

Both sides: the MiniWorld model (``--model``), the views of one MiniWorld concept written
as PNGs (each view repeated so every batch is full), batch ``--batch-size``, fp32, no
validation, no checkpoints, W&B offline, one torch thread (``--threads``).

Printed per method: steps/s (1 / median step time over the timed steps, in process CPU
time so other jobs on shared cores do not count; wall time next to it) and time to the
first step (wall and CPU seconds from process start: imports, loading, data set-up and
the first step), the project's figures over diffusers' as min / median over the repeats.

``--ceiling`` adds a third run to every repeat, in a fresh process: the project's method
built as training builds it, on the same model, images and batch, timing its denoiser
forward + backward alone (conditioning computed beforehand, requiring grad for Textual
Inversion as in training; latents cached) and, interleaved with it, the whole step without
Lightning (``diffusion_loss``, backward, AdamW step). Diffusers' step over the denoiser
alone, per repeat, is the most that any change around the UNet call (data, text encoder,
loss, optimizer, Lightning's loop, logging) could give: a steps/s ratio above it needs a
cheaper UNet call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMER = ROOT / "benchmarks" / "steptimer.py"

SCRIPTS = {
    "dreambooth": "examples/dreambooth/train_dreambooth.py",
    "lora": "examples/dreambooth/train_dreambooth_lora.py",
    "textual_inversion": "examples/textual_inversion/textual_inversion.py",
}
PROJECT = {
    "dreambooth": ("lightning_modules.DreamBooth", {"learning_rate": 1.0e-4}),
    "lora": ("lightning_modules.LoRA", {"learning_rate": 1.0e-4, "rank": 4}),
    "textual_inversion": ("lightning_modules.TextualInversion", {"learning_rate": 5.0e-4}),
}


def write_images(concept: str, folder: Path, batch_size: int) -> tuple[Path, Path, str]:
    """The concept's views twice: as the project's concept folder (views + masks) and as a
    plain image folder for diffusers (views only, repeated to a multiple of the batch)."""
    sys.path.insert(0, str(ROOT))
    from miniworld import write_concept

    project_dir = write_concept(concept, folder / "concept")
    views = sorted(p for p in project_dir.glob("*.png") if not p.stem.endswith("_mask"))
    plain = folder / "images"
    plain.mkdir()
    for k in range(batch_size):  # len(views) * batch_size images: every batch full
        for v in views:
            shutil.copy(v, plain / f"{k}_{v.name}")
    superclass = json.loads((project_dir / "concept.json").read_text())["superclass"]
    return project_dir, plain, superclass


def diffusers_args(method: str, a, images: Path, superclass: str, out: Path, steps: int) -> list[str]:
    common = ["--pretrained_model_name_or_path", str(Path(a.model).resolve()), "--output_dir", str(out),
              "--resolution", str(a.resolution), "--train_batch_size", str(a.batch_size),
              "--max_train_steps", str(steps), "--mixed_precision", "no", "--report_to", "wandb",
              "--checkpointing_steps", "1000000", "--seed", "0", "--lr_scheduler", "constant"]
    if method == "textual_inversion":
        return common + ["--train_data_dir", str(images), "--placeholder_token", "<concept>",
                         "--initializer_token", superclass, "--learnable_property", "object",
                         "--learning_rate", "5e-4", "--save_steps", "1000000", "--repeats", "1"]
    extra = ["--pre_compute_text_embeddings"] + (["--rank", "4"] if method == "lora" else [])
    return common + ["--instance_data_dir", str(images), "--instance_prompt", f"a sks {superclass}",
                     "--learning_rate", "1e-4", *extra]


def project_config(method: str, a, concept_dir: Path, superclass: str, out: Path, steps: int) -> Path:
    import yaml

    cls, init = PROJECT[method]
    placeholder = "<concept>" if method == "textual_inversion" else "sks"
    cfg = {
        "seed_everything": 0,
        "model": {"class_path": cls, "init_args": {"pretrained_model": str(Path(a.model).resolve()), **init}},
        "data": {"class_path": "datamodules.concept.ConceptDataModule", "init_args": {
            "concept_dir": str(concept_dir), "superclass": superclass, "placeholder": placeholder,
            "instance_template": "a {}", "resolution": a.resolution, "batch_size": a.batch_size,
            "repeats": a.batch_size, "random_flip": False}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "max_epochs": -1,
                    "default_root_dir": str(out), "enable_checkpointing": False, "callbacks": [],
                    "limit_val_batches": 0, "num_sanity_val_steps": 0,  # the scripts validate only when asked
                    "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                               "init_args": {"project": "bench", "save_dir": str(out), "offline": True}}},
    }
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cmd: list[str], marks: Path, env: dict, cwd: Path) -> list[tuple[float, float]]:
    proc = subprocess.run([sys.executable, str(TIMER), str(marks), *cmd], env=env, cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not marks.exists():
        sys.exit(f"{' '.join(cmd[:1])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(marks.read_text())


def figures(marks: list[tuple[float, float]], warmup: int) -> dict:
    timed = marks[warmup:]
    wall = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    cpu = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    return {"steps_s_cpu": 1 / statistics.median(cpu), "steps_s_wall": 1 / statistics.median(wall),
            "first_wall": marks[0][0], "first_cpu": marks[0][1], "steps": len(marks)}


def denoiser_time(method: str, model_path: str, concept_dir: str, superclass: str, resolution: int,
                  batch_size: int, warmup: int, steps: int) -> dict:
    """Median CPU seconds of the project's denoiser forward + backward alone and of its
    whole step without Lightning, interleaved (``--ceiling``; run in a fresh process)."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    import lightning_modules
    from components.personalized import fill
    from datamodules.concept import ConceptDataModule

    cls, init = PROJECT[method]
    placeholder = "<concept>" if method == "textual_inversion" else "sks"
    model = getattr(lightning_modules, cls.rpartition(".")[2])(
        pretrained_model=str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        placeholder=placeholder, superclass=superclass, **init)
    model.configure_model()
    model.train()
    model.on_train_start()
    dm = ConceptDataModule(concept_dir=concept_dir, superclass=superclass, placeholder=placeholder,
                           instance_template="a {}", resolution=resolution, batch_size=batch_size,
                           repeats=batch_size, random_flip=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = model.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(0)
    latents = model.encode_latents(batch["pixel_values"], batch["cache_keys"], g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = model.sample_timesteps(len(latents), g, latents.device)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    prompts = [fill(t, model.concept_phrase) for t in batch["templates"]]
    with torch.no_grad():
        cond = model.encode_training_prompts(prompts, timesteps)

    def denoiser():
        c = cond.detach().requires_grad_(model.text_trainable)  # TI: the UNet's backward reaches the conditioning
        t0 = time.process_time()
        (model.components.predict(noisy, timesteps, c) - noise).pow(2).mean().backward()
        dt = time.process_time() - t0
        optimizer.zero_grad()
        return dt

    def step():
        t0 = time.process_time()
        model.diffusion_loss(batch, g)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.process_time() - t0

    times = [(denoiser(), step()) for _ in range(warmup + steps)][warmup:]
    return {"denoiser": statistics.median(t[0] for t in times), "step": statistics.median(t[1] for t in times)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers", required=True, type=Path, help="path to a huggingface/diffusers checkout")
    p.add_argument("--torchvision", type=Path, default=None,
                   help="folder with a transforms-only torchvision for the example scripts (see the docstring)")
    p.add_argument("--methods", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--model", default=str(ROOT / "miniworld" / "pretrained" / "sd"))
    p.add_argument("--concept", default="orange_checkered_ball", help="MiniWorld concept whose views train")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps before the timed ones")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=None, help="also write the table (Markdown) here")
    # one --ceiling run, in its own process: METHOD CONCEPT_DIR SUPERCLASS OUT RESOLUTION BATCH
    p.add_argument("--_denoiser", nargs=6, help=argparse.SUPPRESS)
    p.add_argument("--ceiling", action="store_true",
                   help="also time the project's denoiser forward + backward alone: diffusers' step over it is the "
                        "highest steps/s ratio without a cheaper UNet call")
    a = p.parse_args(argv)
    if a._denoiser:
        import torch

        torch.set_num_threads(a.threads)
        method, concept_dir, superclass, out, resolution, batch_size = a._denoiser
        res = denoiser_time(method, a.model, concept_dir, superclass, int(resolution), int(batch_size), a.warmup, a.steps)
        Path(out).write_text(json.dumps(res))
        return
    for m in a.methods:
        if not (a.diffusers / SCRIPTS[m]).exists():
            p.error(f"{a.diffusers / SCRIPTS[m]} does not exist: --diffusers must be a diffusers checkout")
    if not (Path(a.model) / "model_index.json").exists():
        p.error(f"--model {a.model}: not a diffusers pipeline folder (model_index.json missing)")

    steps = a.warmup + a.steps + 1
    results: dict[str, dict[str, list[dict]]] = {m: {"diffusers": [], "project": [], "ceiling": []} for m in a.methods}
    with tempfile.TemporaryDirectory(prefix="bench_vs_diffusers_") as tmp:
        tmp = Path(tmp)
        concept_dir, images, superclass = write_images(a.concept, tmp, a.batch_size)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        base_env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp), BENCH_THREADS=str(a.threads),
                        OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        ext_path = os.pathsep.join(str(x) for x in (a.torchvision,) if x)
        for r in range(a.repeats):
            for m in a.methods:
                order = ("diffusers", "project") if r % 2 == 0 else ("project", "diffusers")
                for side in order:
                    out = tmp / f"{m}-{side}-{r}"
                    if side == "diffusers":
                        env = dict(base_env, PYTHONPATH=ext_path) if ext_path else dict(base_env)
                        cmd = [str(a.diffusers / SCRIPTS[m]), *diffusers_args(m, a, images, superclass, out, steps)]
                        cwd = a.diffusers
                    else:
                        env = dict(base_env, PYTHONPATH=str(ROOT))
                        cmd = [str(ROOT / "train.py"), "fit", "--config",
                               str(project_config(m, a, concept_dir, superclass, out, steps))]
                        cwd = out
                    marks = run(cmd, tmp / f"{m}-{side}-{r}.json", env, cwd)
                    if len(marks) < a.warmup + 3:
                        sys.exit(f"{side} {m}: only {len(marks)} optimizer steps recorded")
                    f = figures(marks, a.warmup)
                    results[m][side].append(f)
                    print(f"repeat {r} {m:18s} {side:9s} {f['steps_s_cpu']:6.2f} steps/s (CPU), "
                          f"{f['steps_s_wall']:6.2f} (wall), first step after {f['first_wall']:.1f} s wall / "
                          f"{f['first_cpu']:.1f} s CPU", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                if a.ceiling:
                    res = tmp / f"{m}-denoiser-{r}.json"
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--diffusers", str(a.diffusers),
                                           "--model", a.model, "--threads", str(a.threads), "--warmup", str(a.warmup),
                                           "--steps", str(a.steps), "--_denoiser", m, str(concept_dir), superclass,
                                           str(res), str(a.resolution), str(a.batch_size)],
                                          env=dict(base_env, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.exit(f"--ceiling run of {m} failed:\n{proc.stderr[-3000:]}")
                    results[m]["ceiling"].append(json.loads(res.read_text()))
                    c = results[m]["ceiling"][-1]
                    print(f"repeat {r} {m:18s} denoiser fwd+bwd alone {1000 * c['denoiser']:.1f} ms, whole step "
                          f"without Lightning {1000 * c['step']:.1f} ms (CPU)", flush=True)

    import torch

    lines = [f"Training vs diffusers' example scripts: {Path(a.model).name} model, {a.resolution} px, batch "
             f"{a.batch_size}, fp32, {a.steps} timed steps after {a.warmup}, {a.repeats} interleaved repeats, "
             f"{a.threads} thread(s), {platform.machine()} CPU, torch {torch.__version__}. Ratios: project / diffusers "
             "per repeat, min / median (steps/s: higher is better; first step: lower is better).", "",
             "| method | diffusers steps/s | project steps/s | ratio (CPU) | ratio (wall) | diffusers first step | "
             "project first step | ratio (wall) | ratio (CPU) |", "|---|---:|---:|---|---|---:|---:|---|---|"]
    for m in a.methods:
        d, q = results[m]["diffusers"], results[m]["project"]
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731

        def ratio(k):
            rs = [y[k] / x[k] for x, y in zip(d, q)]
            return f"{min(rs):.2f}× / {statistics.median(rs):.2f}×"

        lines.append(f"| {m} | {med(d, 'steps_s_cpu'):.2f} | {med(q, 'steps_s_cpu'):.2f} | {ratio('steps_s_cpu')} | "
                     f"{ratio('steps_s_wall')} | {med(d, 'first_wall'):.1f} s | {med(q, 'first_wall'):.1f} s | "
                     f"{ratio('first_wall')} | {ratio('first_cpu')} |")
    if a.ceiling:
        lines += ["", "Ceiling (`--ceiling`): the project's denoiser forward + backward alone, and its whole step without "
                  "Lightning, per repeat in a fresh process; medians over the repeats, ratios min / median.", "",
                  "| method | diffusers step | project step | project step without Lightning | denoiser fwd + bwd alone | "
                  "denoiser share of the step without Lightning | ceiling: diffusers step / denoiser alone |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for m in a.methods:
            d, q, c = results[m]["diffusers"], results[m]["project"], results[m]["ceiling"]
            med = lambda xs: statistics.median(xs)  # noqa: E731
            ceil = [(1 / x["steps_s_cpu"]) / y["denoiser"] for x, y in zip(d, c)]
            share = [y["denoiser"] / y["step"] for y in c]  # same process, interleaved: steadier than across runs
            lines.append(f"| {m} | {1000 * med([1 / x['steps_s_cpu'] for x in d]):.1f} ms | "
                         f"{1000 * med([1 / x['steps_s_cpu'] for x in q]):.1f} ms | {1000 * med([y['step'] for y in c]):.1f} ms | "
                         f"{1000 * med([y['denoiser'] for y in c]):.1f} ms | {med(share):.0%} | "
                         f"{min(ceil):.2f}× / {med(ceil):.2f}× |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.output:
        a.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
