"""Ground-truth fidelity metrics of MiniWorld concepts, read off images by the world's judge.

In MiniWorld the judge (:mod:`miniworld.judge`) reads scene, shape, colour, pattern and
finish off an image, so what CLIP-I, CLIP-T and DINO only estimate can be counted:

- **identity accuracy**: the share of generated images that show the concept: its shape,
  colour and pattern all right. For an attribute prompt the attribute it asks to change
  is left out (``"a red {}"``: shape and pattern right; ``"a cube shaped {}"``: colour and
  pattern right), so identity measures the concept kept apart from the asked edit.
- **prompt accuracy**: the share of images that show what the prompt asks: the scene of a
  context prompt (``"a {} on the beach"``), the colour, finish or shape of an attribute
  prompt (``"a red {}"``, ``"a shiny {}"``, ``"a cube shaped {}"``). Templates that ask
  for nothing the judge reads (``"a photo of {}"``) are not counted.

Both are torchmetrics metrics (a sum and a count, so they sync exactly across ranks) and
take the same ``update(images, templates)`` as CLIP-T; :class:`metrics.ConceptMetrics`
adds them next to CLIP-I / CLIP-T / DINO when given ``judge=`` (a judge folder, e.g.
``miniworld/pretrained/judge``), reading the concept's ground truth from the
``concept.json`` that :func:`miniworld.write_concept` writes.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from components.pixels import unit_to_signed
from metrics.similarity import _SumCount
from miniworld.concepts import read_concept_truth  # noqa: F401 - part of the judge plugin (metrics.concept)
from miniworld.draw import FINISHES, PATTERNS
from miniworld.judge import Judge, load_judge
from miniworld.scenes import SCENES
from miniworld.world import COLOUR_NAMES, SCENE_NAMES, SHAPE_NAMES, ObjectSpec

JUDGE_METRIC_NAMES = ("identity", "prompt")
IDENTITY_ATTRIBUTES = ("shape", "colour", "pattern")
_PHRASES = sorted(((SCENES[s][0], s) for s in SCENE_NAMES), key=lambda p: -len(p[0]))  # longest first


@lru_cache(maxsize=1024)
def prompt_targets(template: str) -> tuple[tuple[str, int], ...]:
    """What a template asks the judge to see: ``((label, class index), ...)``.

    ``"a {} on the beach"`` -> scene beach; ``"a red {}"`` -> colour red; ``"a shiny {}"``
    -> finish shiny; ``"a cube shaped {}"`` -> shape cube. The scene phrase is matched
    first and removed, so "pink" in "on top of pink fabric" asks for the scene, not a colour.
    """
    text = " ".join(template.lower().replace("{}", " ").split())
    out: dict[str, int] = {}
    for phrase, scene in _PHRASES:
        if phrase in text:
            out["scene"] = SCENE_NAMES.index(scene)
            text = text.replace(phrase, " ")
            break
    words = re.findall(r"[a-z]+", text)
    for i, w in enumerate(words):
        if w == "shaped" and i > 0 and words[i - 1] in SHAPE_NAMES:
            out["shape"] = SHAPE_NAMES.index(words[i - 1])
        elif w in COLOUR_NAMES:
            out["colour"] = COLOUR_NAMES.index(w)
        elif w in FINISHES and w != "plain":
            out["finish"] = FINISHES.index(w)
    return tuple(sorted(out.items()))


def to_judge_input(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> the judge's input: [-1, 1] at ``size`` px."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear",
                          align_corners=None if x.shape[-1] > size else False)
    return unit_to_signed(x).clamp(-1, 1)


@torch.no_grad()
def judge_predictions(judge: Judge, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class indices per label (scene, shape, colour, pattern, finish) of images in [0, 1]."""
    device = next(judge.parameters()).device
    return judge.predict(to_judge_input(images).to(device))


def verdicts(pred: dict[str, torch.Tensor], templates: Sequence[str], truth: ObjectSpec | None):
    """Per image: identity right (bool or None without ground truth) and prompt right
    (bool, or None where the template asks for nothing the judge reads)."""
    ident, prompt = [], []
    for i, template in enumerate(templates):
        targets = dict(prompt_targets(template))
        if targets:
            prompt.append(all(int(pred[k][i]) == v for k, v in targets.items()))
        else:
            prompt.append(None)
        if truth is None:
            ident.append(None)
            continue
        want = {"shape": SHAPE_NAMES.index(truth.shape), "colour": COLOUR_NAMES.index(truth.colour),
                "pattern": PATTERNS.index(truth.pattern)}
        ident.append(all(int(pred[k][i]) == v for k, v in want.items() if k not in targets))
    return ident, prompt


class _JudgeAccuracy(_SumCount):
    """A share of images in [0, 1] that the judge finds right (subclasses say what right is).

    ``update(images, templates)``, or ``update(templates=..., predictions=...)`` with the
    judge's predictions computed once for both metrics.
    """

    def __init__(self, judge: Judge, **kwargs):
        super().__init__(**kwargs)
        self.judge = judge.eval()
        self.judge.requires_grad_(False)
        self.truth: ObjectSpec | None = None  # the concept's ground truth: not a synced state

    def set_truth(self, truth: ObjectSpec | None) -> None:
        self.truth = truth

    def _pick(self, ident, prompt) -> list:
        raise NotImplementedError

    def update(self, images: torch.Tensor | None = None, templates: Sequence[str] = (),
               predictions: dict[str, torch.Tensor] | None = None) -> None:
        pred = judge_predictions(self.judge, images) if predictions is None else predictions
        n = len(next(iter(pred.values())))
        if len(templates) != n:
            raise ValueError(f"{type(self).__name__} needs one template per image: got {len(templates)} for {n} images.")
        ok = [v for v in self._pick(*verdicts(pred, templates, self.truth)) if v is not None]
        if ok:
            self._add(torch.tensor(ok, dtype=torch.float64))


class IdentityAccuracy(_JudgeAccuracy):
    """Share of images showing the concept's shape, colour and pattern (the attribute an
    attribute prompt asks to change left out). Needs :meth:`set_truth` first."""

    def _pick(self, ident, prompt):
        if self.truth is None:
            raise RuntimeError("IdentityAccuracy needs the concept's ground truth: call set_truth(ObjectSpec(...)) "
                               "(a MiniWorld concept folder's concept.json holds it).")
        return ident


class PromptAccuracy(_JudgeAccuracy):
    """Share of images showing what their prompt asks (scene, or colour / finish / shape)."""

    def _pick(self, ident, prompt):
        return prompt


def load_judge_metrics(judge: str | Judge, **kwargs) -> dict[str, _JudgeAccuracy]:
    """``{"identity": IdentityAccuracy, "prompt": PromptAccuracy}`` sharing one judge
    (a folder, e.g. ``miniworld/pretrained/judge``, or a loaded :class:`Judge`)."""
    model = load_judge(judge) if not isinstance(judge, Judge) else judge
    return {"identity": IdentityAccuracy(model, **kwargs), "prompt": PromptAccuracy(model, **kwargs)}


__all__ = ["JUDGE_METRIC_NAMES", "IdentityAccuracy", "PromptAccuracy", "load_judge_metrics", "prompt_targets",
           "judge_predictions", "verdicts", "to_judge_input"]
