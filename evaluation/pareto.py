"""Pareto analysis of a sweep: CLIP-T (prompt fidelity) against CLIP-I (concept fidelity).

Each sampler setting is one point, its metrics averaged over the subjects; the points of
one sweep entry draw a curve; the Pareto front is the set of points that no other point
beats on both axes (the upper-right envelope).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from evaluation.results import NUMERIC


# setting names -> the paper's symbols, for plot labels
_SYMBOLS = {"guidance_superclass_0": "ω⁰_s", "guidance_concept_0": "ω⁰_c", "guidance_superclass": "ω_s",
            "guidance_concept": "ω_c", "guidance_refine": "ω_ref", "guidance": "ω"}
_NAMES = {"clip_i": "CLIP-I (concept fidelity)", "clip_t": "CLIP-T (prompt fidelity)", "dino": "DINO (concept fidelity)",
          "identity": "identity accuracy (judge; concept fidelity)", "prompt": "prompt accuracy (judge; prompt fidelity)"}


def short_label(label: str) -> str:
    """``guidance_superclass=3.5,t_sw=7`` -> ``ω_s=3.5, t_sw=7``."""
    parts = []
    for item in label.split(","):
        key, sep, value = item.partition("=")
        parts.append(f"{_SYMBOLS.get(key, key)}{sep}{value}")
    return ", ".join(parts)


def pareto_mask(xs: list[float], ys: list[float]) -> list[bool]:
    """True for points not dominated: no other point is >= on both axes and > on one."""
    out = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if math.isnan(x) or math.isnan(y):
            out.append(False)
            continue
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(zip(xs, ys)) if j != i
        )
        out.append(not dominated)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean of every metric over subjects, one row per (curve, sampler, setting), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["curve"], r["sampler"], r["settings"]), []).append(r)
    out = []
    for (curve, sampler, settings), rs in groups.items():
        row = {"curve": curve, "sampler": sampler, "setting": rs[0]["setting"], "settings": settings, "subjects": len(rs)}
        for c in NUMERIC:
            vals = [float(r[c]) for r in rs if not math.isnan(float(r.get(c, math.nan)))]
            row[c] = sum(vals) / len(vals) if vals else math.nan
        out.append(row)
    front = pareto_mask([r["clip_t"] for r in out], [r["clip_i"] for r in out])
    for r, f in zip(out, front):
        r["pareto"] = f
    return out


def plot_pareto(summary: list[dict], path: str | os.PathLike, x: str = "clip_t", y: str = "clip_i", title: str | None = None) -> Path:
    """One curve per sweep entry, each point labelled with its setting, the front (of these
    two axes) highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    curves: dict[str, list[dict]] = {}
    for r in summary:
        curves.setdefault(r["curve"], []).append(r)
    for curve, pts in curves.items():
        line, = ax.plot([p[x] for p in pts], [p[y] for p in pts], marker="o", ms=4, lw=1.2, label=curve)
        for p in pts:
            ax.annotate(short_label(p["setting"]), (p[x], p[y]), fontsize=6, color=line.get_color(), xytext=(3, 3), textcoords="offset points")
    on_front = pareto_mask([float(r[x]) for r in summary], [float(r[y]) for r in summary])
    front = sorted((r for r, f in zip(summary, on_front) if f), key=lambda r: r[x])
    if front:
        ax.plot([r[x] for r in front], [r[y] for r in front], "k--", lw=1, zorder=3)
        ax.scatter([r[x] for r in front], [r[y] for r in front], s=90, facecolors="none", edgecolors="k", lw=1.3,
                   zorder=4, label="Pareto front")
    n = max((r.get("subjects", 1) for r in summary), default=0)
    ax.set_xlabel(_NAMES.get(x, x))
    ax.set_ylabel(_NAMES.get(y, y))
    ax.set_title(title or f"{_NAMES.get(y, y).split()[0]} vs {_NAMES.get(x, x).split()[0]}, mean over {n} subject(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
