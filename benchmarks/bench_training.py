"""Training step time and peak memory of every fine-tuning method, next to the same step
written as a plain diffusers training loop.

    python benchmarks/bench_training.py                                   # tiny preset, CPU
    python benchmarks/bench_training.py --model sd2-base-random --device cuda --precision bf16-mixed
    python benchmarks/bench_training.py --methods lora svdiff --steps 50 --output benchmarks/RESULTS.md

Per method, three runs, each in a fresh process (so peak memory is that run's alone):

- ``plain``: a hand-written loop over the method's modules, as diffusers' training
  scripts write it: VAE encode, noise, text encode (the method's own ``encode_prompts``),
  UNet, MSE, backward, AdamW step. No Lightning, no caching.
- ``lightning``: ``Trainer.fit`` of the method's LightningModule on the demo concept with
  latent and text caching off, i.e. the same work: the difference is the framework.
- ``lightning+cache``: the same with the default caching of VAE latents (and of prompt
  embeddings while the text side is frozen).

``--device cuda`` also prints the MFU of each run: 3 × the UNet's counted forward FLOPs
per image (forward + backward) × batch × steps/s over the device's peak for the
precision (benchmarks/flops.py).

Figures: steps/s = 1 / the median step time of ``--steps`` steps after ``--warmup``
steps (the median ignores steps slowed by other load), and peak memory: the
CUDA allocator's peak on GPU, the process's peak RSS on CPU (the whole process: Python,
torch, the model). On CPU the clock is the process's CPU time, so other processes on
shared cores do not count; run with ``--threads 1`` (default on CPU) to keep it equal to
the work done. ``--model sd2-base-random`` builds Stable-Diffusion-2-base-sized components
with random weights (865M-parameter UNet, 512 px) once into the cache folder; nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name -> (LightningModule class, constructor arguments besides the base model)
METHODS = {
    "dreambooth": ("DreamBooth", {}),
    "dreambooth_qkv": ("DreamBoothQKV", {}),
    "textual_inversion": ("TextualInversion", {"placeholder": "<concept>"}),
    "custom_diffusion": ("CustomDiffusion", {"placeholder": "<new1>"}),
    "svdiff": ("SVDiff", {}),
    "lora": ("LoRA", {"rank": 4}),
    "oft": ("OFT", {}),
    "boft": ("BOFT", {}),
    "hifi_tuner": ("HiFiTextualInversion", {}),
}
MODES = ("plain", "lightning", "lightning+cache")
PRECISIONS = {"32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


# --------------------------------------------------------------------------- models


def sd2_base_random_folder() -> Path:
    """Stable Diffusion 2 base sized components, random weights, as a pipeline folder (once)."""
    from components.loader import SD2_BASE_CONFIG, build_components, cache_dir

    folder = cache_dir() / "sd2-base-random"
    if (folder / "model_index.json").exists():
        return folder
    # a small vocabulary; the embedding table has SD2's 49408 rows
    from components.atomic import atomic_path

    with atomic_path(folder, replace=False) as tmp:
        build_components(SD2_BASE_CONFIG, vocab_size=49408).save_pretrained(tmp)
    return folder


def build(method: str, model: str, cache: bool):
    import lightning_modules

    cls_name, kwargs = METHODS[method]
    module = getattr(lightning_modules, cls_name)(
        pretrained_model=model, superclass="ball", cache_latents=cache, cache_text=cache, **kwargs)
    module.configure_model()  # what the Trainer does at fit; the hand-written loop needs it before
    return module


def data(resolution: int, batch_size: int):
    from datamodules.concept import ConceptDataModule

    return ConceptDataModule(concept_dir="demo", resolution=resolution, batch_size=batch_size, allow_upscale=True,
                             repeats=1000)


# --------------------------------------------------------------------------- one run


class Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.now = time.perf_counter if device.type == "cuda" else time.process_time

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.now()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def run_plain(module, dm, device, precision, warmup: int, steps: int) -> list[float]:
    """The step as a plain diffusers loop: no Lightning, no caching."""
    import torch.nn.functional as F

    from components.personalized import fill

    module.to(device).train()
    module.on_train_start()  # frozen modules back to eval mode, as under Lightning
    dm.setup("fit")
    groups = [g for g in module.parameter_groups() if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=module.learning_rate, weight_decay=module.hparams.weight_decay)
    vae, unet, scheduler = module.vae, module.unet, module.noise_scheduler
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "32")
    clock, times = Clock(device), []
    batches = iter(dm.train_dataloader())
    for step in range(warmup + steps):
        if step == warmup:
            reset_peak(device)
        batch = next(batches)
        start = clock()
        with autocast:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(device, vae.dtype)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor  # (B, 4, h, w)
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            cond = module.encode_prompts([fill(tp, module.concept_phrase) for tp in batch["templates"]])  # (B, L, D)
            pred = unet(noisy.to(unet.dtype), t, cond.to(unet.dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(clock() - start)
    return times[warmup:]


def run_lightning(module, dm, device, precision, warmup: int, steps: int) -> list[float]:
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self):
            self.clock, self.times, self._t0 = Clock(device), [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                reset_peak(device)
            self._t0 = self.clock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(self.clock() - self._t0)

    timer = StepTimer()
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision, max_steps=warmup + steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, dm)
    return timer.times[warmup:]


def worker(args) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    model = str(sd2_base_random_folder()) if args.model == "sd2-base-random" else args.model
    module = build(args.method, model, cache=args.mode == "lightning+cache")
    resolution = module.components.resolution
    dm = data(resolution, args.batch_size)
    run = run_plain if args.mode == "plain" else run_lightning
    times = run(module, dm, device, args.precision, args.warmup, args.steps)
    from benchmarks.flops import unet_flops_per_row

    # forward + backward through the UNet: 3x the forward FLOPs, per image of the batch
    flops = 3 * unet_flops_per_row(module.components.unet, module.components.tokenizer.model_max_length) * args.batch_size
    return {"method": args.method, "mode": args.mode, "steps_per_s": 1.0 / statistics.median(times),
            "peak_mib": peak_mib(device), "trainable": module.num_trainable_parameters(), "flops_per_step": flops}


# --------------------------------------------------------------------------- table


def table(rows: list[dict], header: str) -> str:
    by = {(r["method"], r["mode"]): r for r in rows}
    lines = [header, "",
             "| method | trainable params | plain steps/s | Lightning steps/s | Lightning+cache steps/s | "
             "plain peak MiB | Lightning peak MiB | Lightning+cache peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [by.get((method, m)) for m in MODES]
        trainable = next(c["trainable"] for c in cells if c)
        speed = [f"{c['steps_per_s']:.2f}" if c else "–" for c in cells]
        memory = [f"{c['peak_mib']:.0f}" if c else "–" for c in cells]
        lines.append(f"| {method} | {trainable:,} | " + " | ".join(speed) + " | " + " | ".join(memory) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, sd2-base-random, or a model folder / hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=sorted(PRECISIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU line, if not known")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.model == "sd2-base-random":
        sd2_base_random_folder()  # build once, before the timed processes
    rows = []
    for method in args.methods:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", "--method", method, "--mode", mode, "--model", args.model,
                   "--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
            if threads:
                cmd += ["--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{method} / {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            line = f"{method:<18} {mode:<16} {r['steps_per_s']:8.2f} steps/s  {r['peak_mib']:8.0f} MiB peak"
            if args.device.startswith("cuda"):
                from benchmarks.flops import mfu_line

                line += "  " + mfu_line(r["flops_per_step"], 1.0 / r["steps_per_s"], torch.device(args.device),
                                        PRECISIONS[args.precision], args.peak_tflops)
            print(line, flush=True)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        platform.processor() or platform.machine())
    clock = "wall time" if args.device.startswith("cuda") else f"process CPU time, {threads} thread(s)"
    memory = "CUDA allocator peak" if args.device.startswith("cuda") else "process peak RSS"
    header = (f"Training step, {args.model} on {args.device} ({device_name}), precision {args.precision}, batch "
              f"{args.batch_size}, {args.steps} timed steps after {args.warmup}; steps/s in {clock}; peak memory: "
              f"{memory}. torch {torch.__version__}.")
    text = table(rows, header)
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
