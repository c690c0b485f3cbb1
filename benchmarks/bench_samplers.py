"""Time per image of every sampler relative to concept sampling, next to its UNet work.

    python benchmarks/bench_samplers.py                                  # tiny preset, CPU
    python benchmarks/bench_samplers.py --model sd2-base-random --device cuda --dtype float16

The time ratio should track the ratio of UNet evaluations (mixed 1.5x concept, ProFusion
2.5x, Photoswap 1.4x with the study's defaults): the shared loop adds nothing measurable
beyond the UNet work. A second, instrumented pass splits each sampler's time into the
UNet, the text encoder, the VAE decoder and the rest (the loop itself).

``--compile [MODE]`` instead compares one sampler (``--samplers``, default concept)
compiled (``components.compile``, static shapes) against eager: images/s of both, with the
compilation done in a warm-up outside the timed region and the repeats interleaved (min
and median). ``--device cuda`` adds the MFU (achieved UNet FLOP/s from counted FLOPs over
the device's peak, benchmarks/flops.py) to every timing.

``--model`` takes ``tiny``, ``sd2-base-random`` (Stable Diffusion 2 base sized components
with random weights: 865M-parameter UNet at 64x64 latents, nothing to download) or any
model folder / hub id the loader reads.
"""

from __future__ import annotations

import argparse
import inspect
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.loader import DiffusionComponents, load_components  # noqa: E402
from components.personalized import BaseModel  # noqa: E402
from samplers import SAMPLERS, build_sampler, model_only_samplers  # noqa: E402
from benchmarks.flops import mfu_line, unet_flops_per_row  # noqa: E402

TEMPLATES = ["a {} on the beach", "a {} in the snow", "a red {}", "a {} with a city in the background"]


def sd2_base_random(device, dtype) -> DiffusionComponents:
    """Stable Diffusion 2 base sized components with random weights, built on ``device``."""
    from components.loader import SD2_BASE_CONFIG, build_components

    with torch.device(device):
        components = build_components(SD2_BASE_CONFIG, source="sd2-base-random")
    return components.to(dtype=dtype) if dtype != torch.float32 else components


def study_settings(name: str, steps: int) -> dict:
    """The study's defaults, with step counts (t_sw, t_sf, ...) scaled from 50 steps to ``steps``."""
    params = inspect.signature(SAMPLERS[name].__init__).parameters
    settings = {"num_steps": steps}
    for key, p in params.items():
        if key.startswith("t_"):
            settings[key] = round(p.default * steps / 50)
    return settings


def clock_for(device: torch.device):
    """CPU: this process's CPU time, so that other processes sharing the cores do not
    count (run with --threads 1 to keep it equal to the work done). CUDA: wall time."""
    return time.perf_counter if device.type == "cuda" else time.process_time


class Stopwatch:
    """Forward-hook timers per module (synchronising the device around each call)."""

    def __init__(self, modules: dict, device: torch.device):
        self.device, self.total, self.handles = device, {k: 0.0 for k in modules}, []
        self.clock = clock_for(device)
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._start(key)))
            self.handles.append(module.register_forward_hook(self._stop(key)))
        self._t0 = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, key):
        def hook(module, args):
            self._sync()
            self._t0[key] = self.clock()
        return hook

    def _stop(self, key):
        def hook(module, args, out):
            self._sync()
            self.total[key] += self.clock() - self._t0[key]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def timed(fn, device) -> float:
    clock = clock_for(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, sd2-base-random, or a model folder / hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=8, help="images per sampler run")
    parser.add_argument("--batch-size", type=int, default=8, help="images per UNet batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler (the fastest is reported: least disturbed by other load)")
    parser.add_argument("--samplers", nargs="+", default=model_only_samplers(), choices=model_only_samplers())
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="compare compiled (torch.compile MODE) with eager for the first of --samplers")
    parser.add_argument("--superclass", default="dog", help="class word of the prompts")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU line, if not known")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model == "sd2-base-random":
        components = sd2_base_random(device, dtype)
    else:
        components = load_components(args.model, torch_dtype=None if dtype == torch.float32 else dtype)
        for module in components.modules().values():
            module.to(device)
    model = BaseModel(components, superclass=args.superclass)
    flops_row = unet_flops_per_row(components.unet, components.tokenizer.model_max_length)
    if args.compile:
        return compare_compiled(args, model, device, dtype, flops_row)
    templates = (TEMPLATES * args.images)[: max(1, min(len(TEMPLATES), args.images))]
    per_template = -(-args.images // len(templates))
    names = ["concept"] + [n for n in args.samplers if n != "concept"]

    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"# {args.model} on {device} ({args.dtype}), {clock}, {args.steps} DDIM steps, {len(templates) * per_template} "
          f"images per run, batch {args.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    rows = []
    for name in names:
        sampler = build_sampler(name, **study_settings(name, args.steps))

        def run():
            return sampler.sample(model, templates, num_images=per_template, seed=0, batch_size=args.batch_size)

        out = run()  # warm-up; also gives the cost
        n = out.images.shape[0]
        seconds = min(timed(run, device) for _ in range(args.repeats)) / n
        watch = Stopwatch({"unet": components.unet, "text": components.text_encoder, "vae": components.vae.decoder},
                          device)
        total = timed(run, device)
        watch.remove()
        share = {k: v / total for k, v in watch.total.items()}
        rows.append((name, out.cost, seconds, share))
        if device.type == "cuda":
            print(f"{name}: {mfu_line(flops_row * out.cost['unet_evals_per_image'], seconds, device, dtype, args.peak_tflops)}")

    base_evals, base_time = rows[0][1]["unet_evals_per_image"], rows[0][2]
    print(f"{'sampler':<11} {'UNet evals/img':>14} {'eval ratio':>10} {'max batch':>9} {'ms/img':>9} "
          f"{'time ratio':>10} {'UNet':>6} {'text':>6} {'VAE':>6} {'loop':>6}")
    for name, cost, seconds, share in rows:
        loop = 1 - sum(share.values())
        print(f"{name:<11} {cost['unet_evals_per_image']:>14.0f} {cost['unet_evals_per_image'] / base_evals:>10.2f} "
              f"{cost['max_unet_batch']:>9d} {seconds * 1e3:>9.1f} {seconds / base_time:>10.2f} "
              f"{share['unet']:>6.0%} {share['text']:>6.0%} {share['vae']:>6.0%} {loop:>6.0%}")


def compare_compiled(args, model, device, dtype, flops_row) -> dict:
    """images/s of one sampler, eager and compiled, repeats interleaved."""
    import statistics

    from components.compile import compile_unet

    name = args.samplers[0] if args.samplers != model_only_samplers() else "concept"
    sampler = build_sampler(name, **study_settings(name, args.steps))
    templates = (TEMPLATES * args.images)[: max(1, min(len(TEMPLATES), args.images))]
    per_template = -(-args.images // len(templates))
    unet = model.components.unet

    def run():
        return sampler.sample(model, templates, num_images=per_template, seed=0, batch_size=args.batch_size)

    reference = run()  # eager warm-up
    t0 = time.perf_counter()
    compile_unet(unet, args.compile)
    compiled_out = run()  # compiles every shape once, outside the timed region
    compile_s = time.perf_counter() - t0
    compiled_call = unet._compiled_call_impl
    diff = float((compiled_out.images - reference.images).abs().max())
    n = reference.images.shape[0]
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for mode, impl in (("eager", None), ("compiled", compiled_call)):
            unet._compiled_call_impl = impl
            times[mode].append(timed(run, device))
    unet._compiled_call_impl = compiled_call
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"# {name}, {n} images, batch {args.batch_size}, {args.steps} steps, {args.model} on {device} ({args.dtype}), "
          f"{clock}, compile={args.compile!r}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"compile + first run: {compile_s:.1f} s wall; largest image difference compiled vs eager {diff:.2e}")
    rows = reference.cost["unet_evals_per_image"] * n
    for mode in ("eager", "compiled"):
        best, med = min(times[mode]), statistics.median(times[mode])
        line = f"{mode:<9} images/s min-time {n / best:8.2f}  median-time {n / med:8.2f}  ({args.repeats} repeats)"
        if device.type == "cuda":
            line += "  " + mfu_line(flops_row * rows, best, device, dtype, args.peak_tflops)
        print(line)
    ratio_best = min(times["eager"]) / min(times["compiled"])
    ratio_med = statistics.median(times["eager"]) / statistics.median(times["compiled"])
    print(f"compiled / eager images/s: {ratio_best:.2f}x (min), {ratio_med:.2f}x (median)")
    return {"ratio_min": ratio_best, "ratio_median": ratio_med, "diff": diff}


if __name__ == "__main__":
    main()
