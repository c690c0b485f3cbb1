"""Shared test setup: offline W&B, one tiny-preset cache per test session, small threads."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports wandb / builds the tiny preset; spawned worker processes
# (DDP tests) inherit these.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PERSONALIZE_CACHE", os.path.join(tempfile.gettempdir(), "personalize-test-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they bring, and DDP tests spawn more


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one torch thread (tiny tensors; a shared 2-core machine), and a
    test that changes the thread count leaves the next one unchanged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folder():
    """The tiny preset as a diffusers pipeline folder (built once per cache)."""
    from components.loader import tiny_preset_folder

    return tiny_preset_folder()


@pytest.fixture
def demo_dm():
    from datamodules.concept import ConceptDataModule

    return ConceptDataModule(concept_dir="demo", resolution=32, batch_size=2)


def quiet_trainer(**kwargs):
    """A CPU Trainer that prints and writes nothing unless asked."""
    import lightning as L

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def build(cls, **kwargs):
    """A method's module with its components loaded, as the Trainer's ``configure_model`` does."""
    module = cls(**kwargs)
    module.configure_model()
    return module


def make(cls, kwargs=None, **extra):
    """A method on the tiny preset (placeholder ``sks``, superclass ``ball``), built."""
    return build(cls, **{"pretrained_model": "tiny", "placeholder": "sks", "superclass": "ball", "learning_rate": 1e-2,
                         **(kwargs or {}), **extra})


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def repo_workdir(top, subjects: dict[str, str], write_images):
    """A folder to run the command lines from, laid out as a checkout sees it: ``repo/``
    with the repository's configs/ and miniworld/ linked in, and a stand-in DreamBooth
    layout at ``../shared/dreambooth`` (one folder per subject, filled by
    ``write_images(folder)``, and prompts_and_classes.txt). Returns ``repo/``."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cwd = top / "repo"
    cwd.mkdir()
    for name in ("configs", "miniworld"):
        (cwd / name).symlink_to(root / name)
    dreambooth = top / "shared" / "dreambooth"
    for subject in subjects:
        write_images(dreambooth / subject)
    rows = "".join(f"{subject},{cls}\n" for subject, cls in subjects.items())
    (dreambooth / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\n" + rows)
    return cwd
