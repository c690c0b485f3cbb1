"""MiniWorld as training data: a rendered, cached image set and its Lightning DataModule.

Rendering costs a few milliseconds per image, too much to redo at every training step on
a CPU, so :func:`rendered` draws ``World(seed).sample(i)`` for ``i < n`` once and caches
the arrays under ``$PERSONALIZE_CACHE/miniworld`` (keyed by the world's source code, so
a change to the world renders anew). Captions are redrawn at every access from the
ground truth, so the same image is seen with varied wordings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from components.atomic import atomic_path
from components.loader import cache_dir
from components.pixels import SIGNED, from_uint8
from miniworld.draw import FINISHES, PATTERNS
from miniworld.world import COLOUR_NAMES, SCENE_NAMES, SHAPE_NAMES, ObjectSpec, World

LABELS = ("scene", "shape", "colour", "pattern", "finish")
LABEL_NAMES = {"scene": SCENE_NAMES, "shape": SHAPE_NAMES, "colour": COLOUR_NAMES, "pattern": PATTERNS,
               "finish": FINISHES}


def _source_digest() -> str:
    here = Path(__file__).parent
    text = "".join((here / f).read_text() for f in ("world.py", "draw.py", "scenes.py"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def render_arrays(world: World, start: int, stop: int) -> dict[str, np.ndarray]:
    """Samples ``start..stop-1`` as arrays: images (N, H, W, 3) uint8, masks (N, H, W)
    bool, labels (N, 5) int (see :data:`LABELS`)."""
    images, masks, labels = [], [], []
    for i in range(start, stop):
        s = world.sample(i)
        images.append(s.image)
        masks.append(s.mask)
        labels.append([s.labels()[k] for k in LABELS])
    return dict(images=np.stack(images), masks=np.stack(masks), labels=np.asarray(labels, np.int16))


def rendered(seed: int = 0, n: int = 40000, size: int = 32, cache: bool = True) -> dict[str, np.ndarray]:
    """The first ``n`` samples of ``World(seed, size)``, rendered once and cached."""
    path = cache_dir() / "miniworld" / f"world-s{seed}-n{n}-px{size}-{_source_digest()}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = render_arrays(World(seed, size), 0, n)
    if cache:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return arrays


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return from_uint8(images, value_range=SIGNED)


def spec_of(labels) -> tuple[ObjectSpec, str]:
    """Ground-truth object and scene of one row of ``labels``."""
    scene, shape, colour, pattern, finish = (int(x) for x in labels)
    return ObjectSpec(SHAPE_NAMES[shape], COLOUR_NAMES[colour], PATTERNS[pattern], FINISHES[finish]), SCENE_NAMES[scene]


class MiniWorldDataset(Dataset):
    """Items: ``pixel_values`` (3, H, W) in [-1, 1], ``mask`` (1, H, W), ``caption``,
    ``labels`` (5,). The caption is redrawn at each access (from torch's RNG, so runs
    under ``seed_everything`` repeat)."""

    def __init__(self, arrays: dict[str, np.ndarray], world: World):
        self.arrays, self.world = arrays, world

    def __len__(self) -> int:
        return len(self.arrays["images"])

    def __getitem__(self, i: int) -> dict:
        obj, scene = spec_of(self.arrays["labels"][i])
        rng = np.random.default_rng(int(torch.randint(2**31, ())))
        return dict(
            pixel_values=to_tensor(self.arrays["images"][i : i + 1])[0],
            mask=torch.from_numpy(self.arrays["masks"][i]).float()[None],
            caption=self.world.caption(obj, scene, rng),
            labels=torch.from_numpy(self.arrays["labels"][i].astype(np.int64)),
        )


class MiniWorldDataModule(L.LightningDataModule):
    """Captioned MiniWorld images for text-to-image pretraining.

    Args:
        seed: world seed of the training images; validation uses ``seed + 1``.
        num_images: rendered training images (cached on disk after the first run).
        size: image side in pixels.
        batch_size, num_workers: DataLoader settings.
        val_images: number of validation images.
    """

    def __init__(self, seed: int = 0, num_images: int = 40000, size: int = 32, batch_size: int = 64,
                 num_workers: int = 0, val_images: int = 256):
        super().__init__()
        self.save_hyperparameters()
        self.world = World(seed, size)

    def prepare_data(self) -> None:
        rendered(self.hparams.seed, self.hparams.num_images, self.hparams.size)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self.train_set = MiniWorldDataset(rendered(h.seed, h.num_images, h.size), self.world)
        self.val_set = MiniWorldDataset(rendered(h.seed + 1, h.val_images, h.size), World(h.seed + 1, h.size))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.hparams.batch_size, num_workers=self.hparams.num_workers)
