"""Evaluation on the DreamBooth protocol: subjects, sampler sweeps, results table, Pareto plots."""

from evaluation.pareto import pareto_mask, plot_pareto, summarize
from evaluation.results import COLUMNS, ResultStore, cell_key
from evaluation.run import EvalConfig, Ranks, evaluate_cell, fabric_ranks, finish, run_evaluation
from evaluation.subjects import Subject, dreambooth_subjects, folder_subject, resolve_templates
from evaluation.sweep import SweepPoint, expand_entry, expand_sweep

__all__ = [
    "pareto_mask", "plot_pareto", "summarize", "COLUMNS", "ResultStore", "cell_key",
    "EvalConfig", "Ranks", "evaluate_cell", "fabric_ranks", "finish", "run_evaluation",
    "Subject", "dreambooth_subjects", "folder_subject", "resolve_templates",
    "SweepPoint", "expand_entry", "expand_sweep",
]
