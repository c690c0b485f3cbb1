"""The sampling study in MiniWorld, in one command.

    python -m miniworld.study --config configs/miniworld/study.yaml

1. writes the chosen MiniWorld concepts as a DreamBooth-layout root (one folder per
   concept + ``prompts_and_classes.txt``);
2. fine-tunes every method on every concept from the MiniWorld base model and saves its
   artifact (``artifacts/<method>/<concept>``);
3. evaluates every artifact with every sampler over its sweep grid (CLIP-I, CLIP-T and
   DINO with the world's own encoders) through :func:`evaluation.run.run_evaluation`;
4. merges the tables into ``results.csv`` (one row per method × concept × sampler
   setting) and ``summary.csv`` (mean over concepts and methods), draws the Pareto
   plot, and checks the study's qualitative findings (``findings.md``).

Every stage is resumable: an artifact that exists is not retrained and a finished
evaluation cell is not recomputed, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import time
from pathlib import Path

import yaml

from evaluation.pareto import pareto_mask, plot_pareto, summarize
from evaluation.run import EvalConfig, run_evaluation


def load_config(path: str | Path, **overrides) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = v
    unknown = set(cfg.get("run_methods") or []) - set(cfg["methods"])
    if unknown:
        raise ValueError(f"Unknown method(s) {sorted(unknown)}; the config defines {sorted(cfg['methods'])}.")
    if cfg.get("run_methods"):
        cfg["methods"] = {k: v for k, v in cfg["methods"].items() if k in cfg["run_methods"]}
    return cfg


def write_concepts(root: Path, names: list[str], placeholder: str = "sks") -> Path:
    """The concepts as a DreamBooth-layout root the evaluation reads."""
    from miniworld import CONCEPTS, write_concept

    root.mkdir(parents=True, exist_ok=True)
    lines = ["subject_name,class"]
    for name in names:
        if not (root / name / "concept.json").exists():
            write_concept(name, root / name, placeholder=placeholder)
        lines.append(f"{name},{CONCEPTS[name].superclass}")
    (root / "prompts_and_classes.txt").write_text("\n".join(lines) + "\n")
    return root


def train_one(spec: dict, base: str, concept_dir: Path, out: Path, data: dict, seed: int) -> Path:
    """Fine-tune one method on one concept; return its artifact folder (skip if present)."""
    import lightning as L

    from datamodules.concept import ConceptDataModule

    if (out / "personalize.json").exists():
        return out
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    placeholder = spec.get("placeholder", "sks")
    superclass = json.loads((concept_dir / "concept.json").read_text())["superclass"]
    dm = ConceptDataModule(concept_dir=str(concept_dir), placeholder=placeholder, superclass=superclass, seed=seed,
                           **{**data, **spec.get("data", {})})
    L.seed_everything(seed, verbose=False)
    module = cls(pretrained_model=base, placeholder=placeholder, superclass=dm.superclass, seed=seed,
                 **spec.get("init_args", {}))
    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=spec["max_steps"], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    t0 = time.time()
    trainer.fit(module, dm)
    module.eval().save_artifact(out)
    (out / "training.json").write_text(json.dumps({"steps": trainer.global_step, "seconds": time.time() - t0}))
    return out


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    cols = list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if not math.isnan(float(r[key]))]
    return sum(vals) / len(vals) if vals else math.nan


def front_height(points: list[tuple[float, float]], x: float) -> float:
    """Best y among points with x' >= x: the front of a curve seen from a point at x."""
    ys = [py for px, py in points if px >= x]
    return max(ys) if ys else -math.inf


def findings(summary: list[dict]) -> list[dict]:
    """The study's three qualitative findings, checked on the summary (mean over
    concepts and methods): each a dict with the claim, the figures and whether it holds."""
    by = {}
    for r in summary:
        by.setdefault(r["sampler"], []).append(r)
    out = []
    if "concept" in by and "superclass" in by:
        c, s = by["concept"][0], by["superclass"][0]
        out.append({
            "claim": "concept sampling has higher CLIP-I and lower CLIP-T than superclass sampling",
            "figures": f"concept CLIP-I {c['clip_i']:.3f} / CLIP-T {c['clip_t']:.3f}; "
                       f"superclass CLIP-I {s['clip_i']:.3f} / CLIP-T {s['clip_t']:.3f}",
            "holds": c["clip_i"] > s["clip_i"] and c["clip_t"] < s["clip_t"],
        })
    if "mixed" in by and "switching" in by:
        mixed = [(r["clip_t"], r["clip_i"]) for r in by["mixed"]]
        sw = [(r["clip_t"], r["clip_i"]) for r in by["switching"]]
        below = [front_height(mixed, x) >= y for x, y in sw]
        out.append({
            "claim": "the mixed front lies above switching's",
            "figures": f"{sum(below)}/{len(sw)} switching points lie on or below the mixed front "
                       "(a mixed setting with at least their CLIP-T and at least their CLIP-I)",
            "holds": sum(below) >= 0.5 * len(sw),
        })
    if "profusion" in by and "mixed" in by:
        pf = max(by["profusion"], key=lambda r: r["clip_i"])
        mx = min(by["mixed"], key=lambda r: abs(json.loads(r["settings"]).get("guidance_superclass", 0) - 3.5))
        cost = pf["unet_evals_per_image"] / mx["unet_evals_per_image"]
        out.append({
            "claim": "ProFusion raises CLIP-I at about twice the cost",
            "figures": f"ProFusion ({pf['setting']}) CLIP-I {pf['clip_i']:.3f} vs mixed ({mx['setting']}) "
                       f"{mx['clip_i']:.3f}; cost {pf['unet_evals_per_image']:.0f} vs {mx['unet_evals_per_image']:.0f} "
                       f"UNet evaluations per image ({cost:.2f}x)",
            "holds": pf["clip_i"] > mx["clip_i"] and 1.4 <= cost <= 3.0,
        })
    return out


def run_study(cfg: dict, out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    root = write_concepts(out / "concepts", cfg["concepts"])
    base, seed = cfg["base"], cfg.get("seed", 0)
    ev = cfg["evaluation"]
    all_rows: list[dict] = []
    result: dict = {"findings": [], "rows": 0}
    for method, spec in cfg["methods"].items():
        for concept in cfg["concepts"]:
            t0 = time.time()
            train_one(spec, base, root / concept, out / "artifacts" / method / concept, cfg.get("concept_data", {}), seed)
            log(f"[study] trained {method} on {concept} ({time.time() - t0:.0f} s)")
        ecfg = EvalConfig(
            model=base, artifact=str(out / "artifacts" / method / "{subject}"), dreambooth_root=str(root),
            subjects=cfg["concepts"], prompts=str(root / cfg["concepts"][0] / "prompts.txt"),
            num_prompts=ev.get("num_prompts", 0), num_images=ev.get("num_images", 2), seed=seed,
            batch_size=ev.get("batch_size", 25), sweep=cfg["sweep"], defaults=ev.get("defaults", {}),
            clip=cfg["clip"], dino=cfg["dino"], output=str(out / "eval" / method), device=ev.get("device", "auto"),
            save_grids=ev.get("save_grids", True),
        )
        rows = run_evaluation(ecfg, log=lambda m: log(f"[study:{method}] {m}"))
        all_rows += [{"method": method, **r} for r in rows]
        # merged after every method, so an interrupted study still leaves its tables
        result = write_outputs(out, all_rows, list(cfg["methods"]))
    for f in result["findings"]:
        log(f"[study] {'HOLDS' if f['holds'] else 'DOES NOT HOLD'}: {f['claim']} — {f['figures']}")
    return result


def write_outputs(out: Path, all_rows: list[dict], methods: list[str]) -> dict:
    """results.csv, summary.csv (mean over concepts and methods), summary_by_method.csv,
    the Pareto plots and findings.md, from the rows so far."""
    write_rows(out / "results.csv", all_rows)
    summary = summarize(all_rows)
    write_rows(out / "summary.csv", summary)
    per_method = []
    for method in methods:
        mine = [r for r in all_rows if r["method"] == method]
        per_method += [{"method": method, **r} for r in summarize(mine)] if mine else []
    write_rows(out / "summary_by_method.csv", per_method)
    done = sorted({r["method"] for r in all_rows})
    plot_pareto(summary, out / "pareto.png", title=f"MiniWorld: mean over {len(done)} methods and their concepts")
    plot_pareto(summary, out / "pareto_dino.png", y="dino", title="MiniWorld: DINO vs CLIP-T")
    found = findings(summary)
    write_findings(out / "findings.md", summary, found, done)
    return {"findings": found, "rows": len(all_rows)}


def write_findings(path: Path, summary: list[dict], found: list[dict], methods: list[str]) -> None:
    lines = ["# MiniWorld sampling study", "", f"Methods: {', '.join(methods)}. Mean over methods and concepts.", "", "| sampler | setting | CLIP-I | CLIP-T | DINO | UNet evals/image | Pareto |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in summary:
        lines.append(f"| {r['sampler']} | {r['setting']} | {r['clip_i']:.3f} | {r['clip_t']:.3f} | {r['dino']:.3f} | "
                     f"{r['unet_evals_per_image']:.0f} | {'yes' if r['pareto'] else ''} |")
    lines += ["", "## Findings of the paper, checked here", ""]
    for f in found:
        lines.append(f"- **{'holds' if f['holds'] else 'does not hold'}**: {f['claim']}. {f['figures']}.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/miniworld/study.yaml", help="study YAML (methods, concepts, sweep)")
    p.add_argument("--out", default="outputs/miniworld_study", help="output folder (reruns resume here)")
    p.add_argument("--methods", nargs="+", dest="run_methods", help="run only these methods of the config")
    p.add_argument("--concepts", nargs="+", help="MiniWorld concept names (overrides the config)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, run_methods=args.run_methods, concepts=args.concepts)
    return run_study(cfg, Path(args.out))


if __name__ == "__main__":
    main()
