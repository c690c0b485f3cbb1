"""The sampling study in MiniWorld, in one command.

    python -m miniworld.study --config configs/miniworld/study.yaml

1. writes the chosen MiniWorld concepts as a DreamBooth-layout root (one folder per
   concept + ``prompts_and_classes.txt``), photographed as ``concept_context`` says
   (default: all views in one shared scene, so context overfitting can happen);
2. fine-tunes every method on every concept from the MiniWorld base model and saves its
   artifact (``artifacts/<method>/<concept>``);
3. evaluates every artifact with every sampler over its sweep grid (CLIP-I, CLIP-T and
   DINO with the world's own encoders, and the judge's ground-truth identity and prompt
   accuracy) through :func:`evaluation.run.run_evaluation`;
4. merges the tables into ``results.csv`` (one row per method × concept × sampler
   setting), ``summary.csv`` (mean over concepts and methods), ``summary_by_method.csv``,
   ``methods.csv`` (per method, concept sampling: DINO, CLIP-I, CLIP-T, identity, prompt)
   and ``correlations.csv`` (Spearman rank correlation of CLIP-I / DINO with identity
   accuracy and of CLIP-T with prompt accuracy across all cells), draws the Pareto plots
   (``pareto.png``: CLIP-T vs CLIP-I; ``pareto_judge.png``: prompt vs identity accuracy)
   and checks the paper's claims against the numbers (``findings.md``).

``workers: N`` (or ``--workers N``) trains and evaluates N methods at a time in separate
processes (one torch thread each).

Every stage is resumable: an artifact that exists is not retrained and a finished
evaluation cell is not recomputed, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from components.errors import UserError
from evaluation.pareto import pareto_mask, plot_pareto, summarize
from evaluation.run import EvalConfig, run_evaluation


@dataclass
class StudyOptions:
    """The study: the keys of ``configs/miniworld/study.yaml``, and where it writes.

    Args:
        base: the MiniWorld base model every method fine-tunes (a diffusers folder).
        clip: CLIP-like encoder of the metrics (folder).
        dino: DINO-like identity encoder of the metrics (folder).
        judge: the judge (folder): ground-truth identity / prompt accuracy next to CLIP and DINO.
        seed: seed of training and of the per-(prompt, image) latents.
        workers: methods trained and evaluated at a time, in separate processes (1 on a single core).
        concepts: MiniWorld concept names.
        concept_context: how the views are photographed: scene (one shared scene), prop, varied.
        concept_views: views (training images) per concept.
        concept_data: ConceptDataModule arguments shared by all methods.
        methods: name -> {class_path, max_steps, init_args, optional placeholder / data / sweep}, or
            {artifacts_of: an earlier method, sweep}: that method's artifacts sampled another way.
        hifi_ablation: HiFi Tuner's ablation chain (method names), checked in findings.md in this order.
        evaluation: evaluation settings (num_prompts, num_images, batch_size, defaults, save_grids, device).
        sweep: the sampler sweep (evaluate.py's sweep format).
        out: output folder (reruns resume here).
        run_methods: run only these methods of the config (old spelling: --methods NAME ...).
    """

    base: str | None = None
    clip: str | None = None
    dino: str | None = None
    judge: str | None = None
    seed: int = 0
    workers: int = 1
    concepts: list[str] = field(default_factory=list)
    concept_context: str = "scene"
    concept_views: int = 5
    concept_data: dict = field(default_factory=dict)
    methods: dict[str, dict] = field(default_factory=dict)
    hifi_ablation: list[str] | None = None
    evaluation: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    out: str = "outputs/miniworld_study"
    run_methods: list[str] | None = None


DEFAULT_CONFIG = "configs/miniworld/study.yaml"
#: keys of the command line that are not the study's own (not in study_config.yaml)
_RUN_KEYS = ("out", "run_methods")


def load_config(path: str | Path, **overrides) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = v
    return select_methods(cfg)


def select_methods(cfg: dict) -> dict:
    """``cfg`` with ``methods`` narrowed to ``run_methods`` (a ValueError names unknown ones)."""
    unknown = set(cfg.get("run_methods") or []) - set(cfg["methods"])
    if unknown:
        raise ValueError(f"Unknown method(s) {sorted(unknown)}; the config defines {sorted(cfg['methods'])}.")
    names = list(cfg["methods"])
    for name, spec in cfg["methods"].items():
        src = (spec or {}).get("artifacts_of")
        if src is not None and (src not in names or names.index(src) >= names.index(name) or "artifacts_of" in cfg["methods"][src]):
            raise ValueError(f"methods.{name}.artifacts_of: {src!r} must be a method trained earlier in the config "
                             f"({', '.join(names[:names.index(name)]) or 'none'}).")
    if cfg.get("run_methods"):
        cfg["methods"] = {k: v for k, v in cfg["methods"].items() if k in cfg["run_methods"]}
    return cfg


def write_concepts(root: Path, names: list[str], placeholder: str = "sks", context: str = "scene",
                   views: int = 5) -> Path:
    """The concepts as a DreamBooth-layout root the evaluation reads."""
    from miniworld import CONCEPTS, write_concept

    root.mkdir(parents=True, exist_ok=True)
    lines = ["subject_name,class"]
    for name in names:
        meta = root / name / "concept.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old.get("context", "varied") != context or len(old.get("scenes", [])) != views:
                raise ValueError(f"{root / name} holds views of another setting (context {old.get('context', 'varied')}, "
                                 f"{len(old.get('scenes', []))} views): choose another --out, or delete it to start again.")
        else:
            write_concept(name, root / name, num_images=views, placeholder=placeholder, context=context)
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
    if not rows:  # nothing yet (e.g. only a method sampling another's artifacts has run)
        path.write_text("")
        return
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


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation of the pairs where both values are numbers (NaN if < 3)."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if not (math.isnan(float(x)) or math.isnan(float(y)))]
    if len(pairs) < 3:
        return math.nan
    rx, ry = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


#: (estimate, ground truth) pairs whose rank correlation the study reports
CORRELATION_PAIRS = (("clip_i", "identity"), ("dino", "identity"), ("clip_t", "prompt"), ("clip_i", "prompt"),
                     ("clip_t", "identity"))


def correlations(rows: list[dict], summary: list[dict]) -> list[dict]:
    """Spearman ρ of each pair over all cells (method × concept × setting) and over the
    settings' means (the points of the Pareto plots)."""
    out = []
    for x, y in CORRELATION_PAIRS:
        out.append({"estimate": x, "truth": y, "rho_cells": spearman([r[x] for r in rows], [r[y] for r in rows]),
                    "cells": sum(1 for r in rows if not (math.isnan(float(r[x])) or math.isnan(float(r[y])))),
                    "rho_settings": spearman([r[x] for r in summary], [r[y] for r in summary]), "settings": len(summary)})
    return out


def _num(r: dict, key: str) -> float:
    v = r.get(key, math.nan)
    return math.nan if v in ("", None) else float(v)


def method_table(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method, concept sampling (the ω = 7 setting, else the first concept setting; a
    method without concept sampling: its first sampler and setting), mean over concepts:
    DINO, CLIP-I, CLIP-T, identity, prompt (HiFi Tuner's Tables 1-2)."""
    out = []
    for method in methods:
        own = [r for r in rows if r["method"] == method]
        if not own:
            continue
        sampler = "concept" if any(r["sampler"] == "concept" for r in own) else own[0]["sampler"]
        mine = [r for r in own if r["sampler"] == sampler]
        settings = [r["settings"] for r in mine]
        pick = next((st for st in settings if sampler == "concept" and json.loads(st).get("guidance", 7.0) == 7.0),
                    settings[0])
        cells = [r for r in mine if r["settings"] == pick]
        row = {"method": method, "sampler": sampler, "setting": cells[0]["setting"], "concepts": len(cells)}
        for k in ("dino", "clip_i", "clip_t", "identity", "prompt"):
            vals = [_num(r, k) for r in cells if not math.isnan(_num(r, k))]
            row[k] = sum(vals) / len(vals) if vals else math.nan
        out.append(row)
    return out


def _verdict(holds: bool | None) -> str:
    return "not measured" if holds is None else ("holds" if holds else "does not hold")


def _f(r: dict, k: str) -> str:
    v = _num(r, k)
    return "n/a" if math.isnan(v) else (f"{100 * v:.1f}%" if k in ("identity", "prompt") else f"{v:.3f}")


#: steps of a metric across q smaller than this are noise, not instability (CLIP-I/T, DINO;
#: judge shares use 2 binomial standard errors of the setting's images, else JUDGE_NOISE)
CLIP_NOISE, JUDGE_NOISE = 0.005, 0.02


def findings(summary: list[dict], table: list[dict] | None = None, hifi_ablation: list[str] | None = None) -> list[dict]:
    """The paper's claims checked on the summary (mean over concepts and methods) and the
    per-method table: each a dict with the claim, the figures, ``holds`` (True, False,
    or None when the run lacks what the claim needs) and ``verdict`` in words."""
    by: dict[str, list[dict]] = {}
    for r in summary:
        by.setdefault(r["sampler"], []).append(r)
    judged = any(not math.isnan(_num(r, "identity")) for r in summary)
    out = []

    def add(claim, figures, holds):
        out.append({"claim": claim, "figures": figures, "holds": holds, "verdict": _verdict(holds)})

    if "concept" in by and "superclass" in by:
        # the paper's ω = 7 (the first concept setting when the sweep has no ω = 7)
        c = next((r for r in by["concept"] if json.loads(r["settings"]).get("guidance", 7.0) == 7.0), by["concept"][0])
        s = next((r for r in by["superclass"] if json.loads(r["settings"]).get("guidance", 7.0) == 7.0), by["superclass"][0])
        add("concept sampling has higher CLIP-I and lower CLIP-T than superclass sampling",
            f"concept CLIP-I {c['clip_i']:.3f} / CLIP-T {c['clip_t']:.3f}; "
            f"superclass CLIP-I {s['clip_i']:.3f} / CLIP-T {s['clip_t']:.3f}",
            c["clip_i"] > s["clip_i"] and c["clip_t"] < s["clip_t"])
        if judged:
            add("concept sampling overfits the training context: it shows the concept more often but follows the prompt "
                "less often than superclass sampling (judge)",
                f"concept identity {_f(c, 'identity')} / prompt {_f(c, 'prompt')}; superclass identity "
                f"{_f(s, 'identity')} / prompt {_f(s, 'prompt')}",
                _num(c, "identity") > _num(s, "identity") and _num(c, "prompt") < _num(s, "prompt"))
    if "mixed" in by and "switching" in by:
        for x, y, name in (("clip_t", "clip_i", "CLIP"), ("prompt", "identity", "judge")):
            if name == "judge" and not judged:
                continue
            mixed = [(_num(r, x), _num(r, y)) for r in by["mixed"]]
            sw = [(_num(r, x), _num(r, y)) for r in by["switching"]]
            below = [front_height(mixed, px) >= py for px, py in sw]
            add(f"the mixed front lies above switching's ({name} axes)" if name == "judge" else
                "the mixed front lies above switching's",
                f"{sum(below)}/{len(sw)} switching points lie on or below the mixed front "
                "(a mixed setting with at least their prompt fidelity and at least their concept fidelity)",
                sum(below) >= 0.5 * len(sw))
    groups: dict[str, list[dict]] = {}  # masked settings by everything but q, each sorted by q
    for r in by.get("masked", []):
        st = json.loads(r["settings"])
        if "q" in st:
            groups.setdefault(json.dumps({k: v for k, v in st.items() if k != "q"}, sort_keys=True), []).append(r)
    groups = {k: sorted(v, key=lambda r: json.loads(r["settings"])["q"]) for k, v in groups.items() if len(v) >= 3}
    if groups:
        def turns(vals, tol):  # direction changes of a sequence, steps within noise (|step| <= tol) ignored
            d = [b - a for a, b in zip(vals, vals[1:]) if abs(b - a) > tol]
            return sum(1 for a, b in zip(d, d[1:]) if (a > 0) != (b > 0))

        def noise(key, rows_q):  # CLIP/DINO: the README's ~0.005; judge shares: 2 standard errors
            if key not in ("identity", "prompt"):
                return CLIP_NOISE
            n = min((_num(r, "num_images") for r in rows_q), default=float("nan"))
            p = sum(_num(r, key) for r in rows_q) / len(rows_q)
            return 2 * math.sqrt(max(p * (1 - p), 1e-4) / n) if n == n and n > 0 else JUDGE_NOISE

        keys = ("clip_i", "clip_t", "identity", "prompt") if judged else ("clip_i", "clip_t")
        texts, unstable = [], []
        for rows_q in groups.values():
            qs = [json.loads(r["settings"])["q"] for r in rows_q]
            rest = rows_q[0]["setting"].split(",q=")[0]
            series = {k: [_num(r, k) for r in rows_q] for k in keys}
            texts.append(f"{rest}, q={qs}: " + "; ".join(f"{k} " + ", ".join(_f({k: v}, k) for v in vals)
                                                     for k, vals in series.items()))
            unstable.append(any(turns(v, noise(k, rows_q)) > 0 for k, v in series.items()))
        add("masked sampling is unstable across q (its metrics do not move monotonically with the mask quantile, "
            "beyond noise)",
            " | ".join(texts), any(unstable))
    if "profusion" in by and "mixed" in by:
        pf = max(by["profusion"], key=lambda r: r["clip_i"])
        mx = min(by["mixed"], key=lambda r: abs(json.loads(r["settings"]).get("guidance_superclass", 0) - 3.5))
        cost = pf["unet_evals_per_image"] / mx["unet_evals_per_image"]
        add("ProFusion raises CLIP-I at about twice the cost",
            f"ProFusion ({pf['setting']}) CLIP-I {pf['clip_i']:.3f} vs mixed ({mx['setting']}) "
            f"{mx['clip_i']:.3f}; cost {pf['unet_evals_per_image']:.0f} vs {mx['unet_evals_per_image']:.0f} "
            f"UNet evaluations per image ({cost:.2f}x)",
            pf["clip_i"] > mx["clip_i"] and 1.4 <= cost <= 3.0)
    rows = {r["method"]: r for r in table or []}
    steps = [m for m in (hifi_ablation or []) if m in rows]
    if len(steps) >= 2:
        chain = [rows[m] for m in steps]
        more_dino = [b["dino"] > a["dino"] for a, b in zip(chain, chain[1:])]
        kept = [abs(r["clip_t"] - chain[0]["clip_t"]) <= 0.01 for r in chain[1:]]
        add("HiFi Tuner's techniques each add DINO while keeping CLIP-T (within 0.01; each method's row of the "
            "per-method table)",
            " → ".join(f"{m} DINO {rows[m]['dino']:.3f} CLIP-T {rows[m]['clip_t']:.3f}" for m in steps),
            all(more_dino) and all(kept))
    return out


def run_method(cfg: dict, out: Path, method: str, log=print) -> list[dict]:
    """Train ``method`` on every concept (skipping finished artifacts) and evaluate it
    over the sweep (skipping finished cells); its rows, each with ``method``."""
    spec, root = cfg["methods"][method], out / "concepts"
    base, seed, ev = cfg["base"], cfg.get("seed", 0), cfg["evaluation"]
    trained = spec.get("artifacts_of", method)
    for concept in cfg["concepts"]:
        if trained != method:  # another method's artifacts, sampled another way: they must exist
            if not (out / "artifacts" / trained / concept / "personalize.json").exists():
                raise UserError(f"{method} samples {trained}'s artifacts, and {trained} has none for {concept} in {out}",
                                fix=f"run {trained} first (--run_methods {trained} {method})")
            continue
        t0 = time.time()
        train_one(spec, base, root / concept, out / "artifacts" / method / concept, cfg.get("concept_data", {}), seed)
        log(f"[study] trained {method} on {concept} ({time.time() - t0:.0f} s)")
    ecfg = EvalConfig(
        model=base, artifact=str(out / "artifacts" / trained / "{subject}"), dreambooth_root=str(root),
        subjects=cfg["concepts"], prompts=str(root / cfg["concepts"][0] / "prompts.txt"),
        num_prompts=ev.get("num_prompts", 0), num_images=ev.get("num_images", 2), seed=seed,
        batch_size=ev.get("batch_size", 25), sweep=spec.get("sweep", cfg["sweep"]), defaults=ev.get("defaults", {}),
        clip=cfg["clip"], dino=cfg["dino"], judge=cfg.get("judge"), output=str(out / "eval" / method),
        device=ev.get("device", "auto"), save_grids=ev.get("save_grids", True),
    )
    rows = run_evaluation(ecfg, log=lambda m: log(f"[study:{method}] {m}"))
    return [{"method": method, **r} for r in rows]


def _worker(args) -> list[dict]:
    cfg, out, method = args
    import torch

    torch.set_num_threads(1)
    return run_method(cfg, Path(out), method, log=lambda m: print(m, flush=True))


def run_study(cfg: dict, out: Path, log=print, workers: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_concepts(out / "concepts", cfg["concepts"], context=cfg.get("concept_context", "scene"),
                   views=cfg.get("concept_views", 5))
    methods = list(cfg["methods"])
    workers = max(1, min(workers or cfg.get("workers", 1), len(methods)))
    by_method: dict[str, list[dict]] = {}
    result: dict = {"findings": [], "rows": 0}
    t0 = time.time()
    if workers == 1:
        for method in methods:
            by_method[method] = run_method(cfg, out, method, log)
            # merged after every method, so an interrupted study still leaves its tables
            result = write_outputs(out, [r for m in methods if m in by_method for r in by_method[m]], methods, cfg)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
            def submit(m):
                return pool.apply_async(_worker, ((cfg, str(out), m),))

            # a method sampling another's artifacts starts once that one has finished
            jobs = {m: submit(m) for m in methods if cfg["methods"][m].get("artifacts_of") not in methods}
            for method in methods:  # merged as methods finish, in config order
                if method not in jobs:
                    jobs[method] = submit(method)
                by_method[method] = jobs[method].get()
                result = write_outputs(out, [r for m in methods if m in by_method for r in by_method[m]], methods, cfg)
    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    log(f"[study] {result['rows']} rows, {len(methods)} method(s) on {workers} worker(s) in {time.time() - t0:.0f} s "
        f"wall, {cpu:.0f} s CPU")
    for f in result["findings"]:
        log(f"[study] {f['verdict'].upper()}: {f['claim']} — {f['figures']}")
    return result


def write_outputs(out: Path, all_rows: list[dict], methods: list[str], cfg: dict | None = None) -> dict:
    """results.csv, summary.csv (mean over concepts and methods), summary_by_method.csv,
    methods.csv, correlations.csv, the Pareto plots and findings.md, from the rows so far."""
    write_rows(out / "results.csv", all_rows)
    # the samplers' means over methods: a method that samples another's artifacts
    # (artifacts_of) is left out, its own sampler being run for that one method only
    specs = (cfg or {}).get("methods", {})
    pooled = [r for r in all_rows if "artifacts_of" not in (specs.get(r["method"]) or {})]
    summary = summarize(pooled)
    write_rows(out / "summary.csv", summary)
    per_method = []
    for method in methods:
        mine = [r for r in all_rows if r["method"] == method]
        per_method += [{"method": method, **r} for r in summarize(mine)] if mine else []
    write_rows(out / "summary_by_method.csv", per_method)
    table = method_table(all_rows, methods)
    if table:
        write_rows(out / "methods.csv", table)
    corr = correlations(all_rows, summary)
    write_rows(out / "correlations.csv", corr)
    done = [m for m in methods if any(r["method"] == m for r in pooled)]
    title = f"MiniWorld: mean over {len(done)} methods and their concepts"
    if summary:
        plot_pareto(summary, out / "pareto.png", title=title)
        plot_pareto(summary, out / "pareto_dino.png", y="dino", title="MiniWorld: DINO vs CLIP-T")
    judged = any(not math.isnan(_num(r, "identity")) for r in all_rows)
    if judged and summary:
        plot_pareto(summary, out / "pareto_judge.png", x="prompt", y="identity",
                    title=f"MiniWorld, the judge's ground truth: {title[11:]}")
    found = findings(summary, table, (cfg or {}).get("hifi_ablation"))
    ran = [m for m in methods if any(r["method"] == m for r in all_rows)]
    write_findings(out / "findings.md", summary, found, ran, table, corr if judged else [], cfg)
    return {"findings": found, "rows": len(all_rows), "table": table, "correlations": corr}


def write_findings(path: Path, summary: list[dict], found: list[dict], methods: list[str], table: list[dict] = (),
                   corr: list[dict] = (), cfg: dict | None = None) -> None:
    cfg = cfg or {}
    ev = cfg.get("evaluation", {})
    lines = ["# MiniWorld sampling study", "",
             f"Methods: {', '.join(methods)}. Concepts: {', '.join(cfg.get('concepts', []))} "
             f"(views: {cfg.get('concept_views', 5)}, context: {cfg.get('concept_context', 'scene')}). "
             f"{ev.get('num_images', '?')} image(s) per prompt, {ev.get('defaults', {}).get('num_steps', 50)} DDIM steps. "
             "Identity / prompt: the world's judge (shares of images showing the concept / what the prompt asks).", "",
             "## Per sampler setting (mean over methods and concepts)", "",
             *([f"Methods that sample another's artifacts ({', '.join(extra)}) are in the per-method table only.", ""]
               if (extra := [m for m in methods if "artifacts_of" in (cfg.get("methods", {}).get(m) or {})]) else []),
             "| sampler | setting | CLIP-I | CLIP-T | DINO | identity | prompt | UNet evals/image | Pareto (CLIP) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in summary:
        lines.append(f"| {r['sampler']} | {r['setting']} | {r['clip_i']:.3f} | {r['clip_t']:.3f} | {r['dino']:.3f} | "
                     f"{_f(r, 'identity')} | {_f(r, 'prompt')} | {r['unet_evals_per_image']:.0f} | "
                     f"{'yes' if r['pareto'] else ''} |")
    if table:
        lines += ["", "## Per method (concept sampling at ω = 7 unless named, mean over concepts)", "",
                  "| method | sampler | DINO | CLIP-I | CLIP-T | identity | prompt |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in table:
            lines.append(f"| {r['method']} | {r.get('sampler', 'concept')} | {_f(r, 'dino')} | {_f(r, 'clip_i')} | {_f(r, 'clip_t')} | "
                         f"{_f(r, 'identity')} | {_f(r, 'prompt')} |")
    if corr:
        lines += ["", "## Do the estimates track the ground truth? (Spearman ρ)", "",
                  "| estimate | ground truth | ρ over cells | cells | ρ over settings | settings |", "|---|---|---:|---:|---:|---:|"]
        for c in corr:
            lines.append(f"| {c['estimate']} | {c['truth']} | {c['rho_cells']:.2f} | {c['cells']} | "
                         f"{c['rho_settings']:.2f} | {c['settings']} |")
    lines += ["", "## Findings of the paper, checked here", ""]
    for f in found:
        lines.append(f"- **{f['verdict']}**: {f['claim']}. {f['figures']}.")
    path.write_text("\n".join(lines) + "\n")


def build_parser():
    from components.cli import command_parser

    return command_parser(StudyOptions, prog="python -m miniworld.study", description=__doc__.split("\n\n")[0],
                          epilog=f"Without --config, {DEFAULT_CONFIG} is read (when it exists). "
                                 "--methods NAME ... is the old spelling of --run_methods.")


def parse_options(argv: list[str] | None = None) -> StudyOptions:
    import sys

    from components.cli import parse_options as parse

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and Path(DEFAULT_CONFIG).is_file():
        argv = ["--config", DEFAULT_CONFIG, *argv]
    return parse(build_parser(), StudyOptions, argv, aliases={"--methods": ["--run_methods"]})


def main(argv: list[str] | None = None) -> dict:
    from components.cli import user_errors

    options = parse_options(argv)
    with user_errors("python -m miniworld.study"):  # before any work
        cfg = {k: v for k, v in asdict(options).items() if k not in _RUN_KEYS and v is not None}
        missing = [k for k in ("base", "clip", "dino") if not cfg.get(k)] + \
                  [k for k in ("concepts", "methods", "sweep") if not cfg.get(k)]
        if missing:
            raise UserError(f"the study names no {', '.join(missing)}",
                            fix=f"give a study config: --config {DEFAULT_CONFIG}")
        cfg = select_methods({**cfg, **({"run_methods": options.run_methods} if options.run_methods else {})})
    return run_study(cfg, Path(options.out), workers=options.workers)


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog="python -m miniworld.study")
