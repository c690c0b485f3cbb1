"""The README's quickstart through train.py (shortened): an offline W&B run with a loss
curve and a non-blank image grid, a checkpoint, and the exported artifact. The concept grid is
rendered once per validation (SamplerValidation's concept sampler) and logged as W&B's
val/images too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from wandb_offline import images, metric_values, run_dir

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_leaves_run_checkpoint_and_artifact(tmp_path):
    out = tmp_path / "outputs" / "quickstart"  # the config's relative paths, under cwd
    # the README's config, shortened: 4 epochs of 3 steps, validation every 2 epochs
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"].update(max_epochs=4, check_val_every_n_epoch=2)
    cfg["data"]["init_args"]["repeats"] = 2
    classes = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert "callbacks.ImageGridLogger" not in classes  # one render of the concept grid: SamplerValidation's
    validation, final = [c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"] == "callbacks.SamplerValidation"]
    assert validation["grid_aliases"] == {"concept": "val/images"}
    validation.update(every_n_epochs=2, num_prompts=2, num_images=1)
    # the final score: judged at the last epoch, printed
    assert final["at_train_end"] and not final["every_n_epochs"] and final["print_values"] and final["judge"]
    final.update(num_prompts=3, num_images=1)
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(cfg))
    args = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(tmp_path / "quickstart.yaml")]
    # a W&B run started earlier in this pytest process leaves service variables in the
    # environment; the child must start its own service
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k in ("WANDB_MODE", "WANDB_SILENT")}
    # the config names repository paths (miniworld/pretrained/...): run from a folder that
    # sees them, writing outputs under tmp_path
    for name in ("miniworld",):
        (tmp_path / name).symlink_to(ROOT / name)
    proc = subprocess.run(args, cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = run_dir(out)
    losses = metric_values(run, "train/loss")
    assert len(losses) >= 3 and all(0 < v < 10 for v in losses)
    grids = images(run, "images")
    assert len(grids) == 2  # one grid per validation epoch
    for sampler in ("concept", "superclass", "mixed"):  # SamplerValidation with MiniWorld's CLIP and DINO
        for metric in ("clip_i", "clip_t", "dino"):
            values = metric_values(run, f"val/{sampler}/{metric}")
            assert values and all(-1 <= v <= 1 for v in values), (sampler, metric)
    media = run / "files" / "media" / "images" / "val"
    in_order = lambda pattern: [np.asarray(Image.open(f).convert("RGB"))  # noqa: E731 - by W&B's history row
                                for f in sorted(media.glob(pattern), key=lambda f: int(f.name.split("_")[1]))]
    aliased, concept = in_order("images_*.png"), in_order("concept/grid_*.png")
    assert len(aliased) == len(concept) == 2
    for grid, concept_grid in zip(aliased, concept):  # val/images is that validation's concept grid, pixel for pixel
        assert np.array_equal(grid, concept_grid)
        assert grid.shape[0] == 2 + 2 * 34 and grid.std() > 5  # 2 prompt rows of 32 px images, not blank
    assert not np.array_equal(aliased[0], aliased[1])  # the model trained between the two
    pngs = sorted(p.name for p in out.rglob("images/*.png"))  # the grids as PNG in images/
    assert len(pngs) == 2 * 3 + 2 and all(p.startswith(("val_concept_grid", "val_superclass_grid", "val_mixed_grid",
                                                        "val_final_concept_grid", "val_final_superclass_grid"))
                                          for p in pngs), pngs
    # the final score: the judge's identity / prompt accuracy once, at the last step, printed and logged
    for sampler in ("final_concept", "final_superclass"):
        for metric in ("identity", "prompt"):
            values = metric_values(run, f"val/{sampler}/{metric}")
            assert len(values) == 1 and 0 <= values[0] <= 1, (sampler, metric, values)  # one history row
        shown = [line for line in proc.stdout.splitlines() if f"] {sampler}: " in line and ": chose " not in line]
        identity = metric_values(run, f"val/{sampler}/identity")[0]
        assert len(shown) == 1 and f"identity {100 * identity:.1f}%" in shown[0], shown
    # the concept sampler's schedule, chosen first by DINO (no judge): printed, logged, written as a sampler YAML
    assert list(final["choose"]) == ["final_concept"] and final["choose_by"] == "dino"
    chose = [line for line in proc.stdout.splitlines() if "] final_concept: chose " in line]
    chosen = metric_values(run, "val/final_concept/chosen")
    assert len(chose) == 1 and len(chosen) == 1, (chose, chosen)
    from samplers.registry import load_sampler_config
    from callbacks.sampling import candidate_label

    overrides = final["choose"]["final_concept"][int(chosen[0])]
    assert f"chose {candidate_label(overrides)} by dino" in chose[0]
    name, settings = load_sampler_config(out / "samplers" / "final_concept.yaml")
    assert name == "concept" and settings == {"guidance": 3.0, **overrides}
    assert (out / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == ["embeddings"]  # only what trains: HiFi Tuner's learned vectors
    assert (out / "artifact" / "personalize.json").exists()
    assert (out / "artifact" / "hifi_embeddings.safetensors").exists()
    # the artifact of a LightningCLI run loads (LightningCLI's "_class_path"/"_instantiator"
    # hyperparameters are not method arguments and stay out of it)
    init_args = json.loads((out / "artifact" / "personalize.json").read_text())["init_args"]
    assert not [k for k in init_args if k.startswith("_")], init_args
    from lightning_modules import load_personalized

    model = load_personalized(str(ROOT / "miniworld" / "pretrained" / "sd"), out / "artifact")
    assert model.concept_phrase

    # the README's before/after picture of the quickstart's artifact (python -m miniworld before-after)
    from miniworld.figures import before_after

    picture = tmp_path / "before_after.png"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the artifact names its base model by the config's relative path
    try:
        rows = before_after(out / "artifact", picture, concept=cfg["data"]["init_args"]["concept_dir"], num_prompts=2,
                            num_images=1, num_steps=3, guidance=3.0, scale=1)
        at_7 = before_after(out / "artifact", tmp_path / "at_7.png", num_prompts=2, num_images=1, num_steps=3, scale=1)
    finally:
        os.chdir(cwd)
    # guidance moves the concept rows (before and after) only
    assert list(at_7) == ["before", "concept", "superclass"] and torch.equal(at_7["superclass"], rows["superclass"])
    assert all((at_7[k] - rows[k]).abs().max() > 0.01 for k in ("before", "concept"))
    assert list(rows) == ["views", "before", "concept", "superclass"]
    assert all(r.shape == (2, 3, 32, 32) for r in rows.values())
    # the same x_T in every sampled row: the fine-tuned model (concept) and the base (before) differ,
    # and the concept and superclass samplers of the same model differ
    assert (rows["before"] - rows["concept"]).abs().max() > 0.05
    assert (rows["concept"] - rows["superclass"]).abs().max() > 0.05
    sheet = Image.open(picture)
    # a 30 px header and 4 rows of one 32 px image (+ 2 + 2 grid padding), each + 6 below; labels 110 px wide
    assert sheet.size == (110 + 2 * 34 + 2, (30 + 6) + 4 * (34 + 2 + 6))
