"""MiniWorld's ground-truth metrics (judge identity and prompt accuracy) against values
counted by hand on rendered images with known labels, through the metric classes, through
ConceptMetrics and the evaluation table; and the concept views' shared context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miniworld.concepts import CONTEXTS, HOME_SCENES, concept_views, read_concept_truth, write_concept
from miniworld.metrics import IdentityAccuracy, PromptAccuracy, prompt_targets
from miniworld.world import CONCEPTS, COLOUR_NAMES, SCENE_NAMES, SHAPE_NAMES, ObjectSpec, World

JUDGE = "miniworld/pretrained/judge"
BALL = CONCEPTS["orange_checkered_ball"].obj


def test_prompt_targets_read_the_templates():
    assert prompt_targets("a {} on the beach") == (("scene", SCENE_NAMES.index("beach")),)
    # the colour word of a scene phrase asks for the scene, not a colour
    assert prompt_targets("a {} on top of pink fabric") == (("scene", SCENE_NAMES.index("pink_fabric")),)
    assert prompt_targets("a {} on top of a purple rug in a forest") == (("scene", SCENE_NAMES.index("purple_rug")),)
    assert prompt_targets("a {} with the Eiffel Tower in the background") == (("scene", SCENE_NAMES.index("eiffel_tower")),)
    assert prompt_targets("a red {}") == (("colour", COLOUR_NAMES.index("red")),)
    assert prompt_targets("a shiny {}") == (("finish", 1),)
    assert prompt_targets("a cube shaped {}") == (("shape", SHAPE_NAMES.index("cube")),)
    assert prompt_targets("a photo of {}") == ()


def _render(obj: ObjectSpec, scene: str, i: int) -> torch.Tensor:
    image, _ = World(0).render(obj, scene, np.random.default_rng([7, i]))
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255  # (3, 32, 32) in [0, 1]


# (object drawn, scene drawn, template, identity right, prompt right), counted by hand
CASES = [
    (BALL, "beach", "a {} on the beach", True, True),
    (BALL, "snow", "a {} on the beach", True, False),  # the concept, in the wrong scene
    (ObjectSpec("ball", "green", "checkered"), "beach", "a {} on the beach", False, True),  # wrong colour
    (ObjectSpec("ball", "orange", "striped"), "city", "a {} with a city in the background", False, True),  # pattern
    (ObjectSpec("ball", "red", "checkered"), "jungle", "a red {}", True, True),  # the asked colour edit
    (BALL, "jungle", "a red {}", True, False),  # the edit ignored: identity kept, prompt wrong
    (ObjectSpec("cube", "orange", "checkered"), "water", "a cube shaped {}", True, True),
    (ObjectSpec("star", "orange", "checkered"), "water", "a {} floating on top of water", False, True),  # shape
]


def test_identity_and_prompt_accuracy_on_rendered_images_with_known_labels():
    from miniworld.metrics import load_judge_metrics

    images = torch.stack([_render(o, s, i) for i, (o, s, *_) in enumerate(CASES)])
    templates = [c[2] for c in CASES]
    metrics = load_judge_metrics(JUDGE)
    metrics["identity"].set_truth(BALL)
    for m in metrics.values():  # two updates: the mean is over every image seen
        m.update(images[:3], templates[:3])
        m.update(images[3:], templates[3:])
    assert float(metrics["identity"].compute()) == pytest.approx(5 / 8)  # cases 0, 1, 4, 5, 6
    assert float(metrics["prompt"].compute()) == pytest.approx(6 / 8)  # all but cases 1 and 5
    # 64 px images are read at the judge's 32 px
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    ident = IdentityAccuracy(metrics["identity"].judge)
    ident.set_truth(BALL)
    ident.update(big, templates)
    assert float(ident.compute()) == pytest.approx(5 / 8)
    prompt = PromptAccuracy(metrics["identity"].judge)
    prompt.update(images[:2], ["a photo of {}", "a {} on the beach"])  # the first asks for nothing: not counted
    assert float(prompt.compute()) == 0.0 and int(prompt.count) == 1
    with pytest.raises(RuntimeError, match="ground truth"):
        IdentityAccuracy(metrics["identity"].judge).update(images[:1], templates[:1])


def test_concept_metrics_and_evaluation_report_the_judge(tmp_path):
    from evaluation import EvalConfig, run_evaluation
    from metrics import ConceptMetrics

    folder = write_concept("orange_checkered_ball", tmp_path / "root" / "ball", num_images=2)
    assert read_concept_truth(folder) == BALL
    m = ConceptMetrics(clip="tiny", dino=None, judge=JUDGE)
    m.set_concept(str(folder), "ball")  # the ground truth from concept.json
    images = torch.stack([_render(o, s, i) for i, (o, s, *_) in enumerate(CASES)])
    m.update(images, [c[2] for c in CASES])
    values = m.compute()
    assert values["identity"] == pytest.approx(5 / 8) and values["prompt"] == pytest.approx(6 / 8)
    assert set(values) == {"clip_i", "clip_t", "identity", "prompt"}
    with pytest.raises(ValueError, match="MiniWorld concept"):
        m.set_concept(images[:2], "ball")  # tensors, no concept.json, no truth given

    (tmp_path / "root" / "prompts_and_classes.txt").write_text("subject_name,class\nball,ball\n")
    cfg = EvalConfig(model="tiny", dreambooth_root=str(tmp_path / "root"), prompts=["a {} on the beach", "a red {}"],
                     num_images=1, sweep=[{"sampler": "concept", "settings": {"num_steps": 2}}], clip="tiny", dino=None,
                     judge=JUDGE, output=str(tmp_path / "eval"), device="cpu", save_grids=False)
    rows = run_evaluation(cfg, log=lambda *_: None)
    assert len(rows) == 1 and 0 <= rows[0]["identity"] <= 1 and rows[0]["prompt"] in (0.0, 0.5, 1.0)
    assert (tmp_path / "eval" / "pareto_judge.png").exists()
    header = (tmp_path / "eval" / "summary.csv").read_text().splitlines()[0]
    assert "identity" in header and "prompt" in header


def test_concept_views_share_their_context():
    assert CONTEXTS == ("scene", "prop", "varied")
    for name in CONCEPTS:
        scenes = {v.scene for v in concept_views(name, 6, "scene")}
        assert scenes == {HOME_SCENES[name]}
        assert len({v.scene for v in concept_views(name, 6, "varied")}) == 6
    scene, prop = concept_views("blue_striped_star", 4, "scene"), concept_views("blue_striped_star", 4, "prop")
    for a, b in zip(scene, prop):  # the prop adds white pixels beside the subject, never on it
        assert (a.image[a.mask] == b.image[b.mask]).all()
        changed = (a.image != b.image).any(-1)
        assert changed.sum() > 10 and not (changed & a.mask).any()
    with pytest.raises(ValueError, match="context"):
        concept_views("blue_striped_star", 4, "kitchen")
