"""The concept DataModule: a handful of images of one subject, its superclass word, and
optional prior-preservation class images, for every fine-tuning method.

Concept folder convention::

    my_dog/
        00.jpg  01.png  02.webp ...        # the concept images
        00_mask.png                        # optional subject mask of 00.jpg: one channel,
                                           # same size as the image, white (>127) = subject

Alternatively ``dreambooth_root`` + ``subject`` reads the DreamBooth dataset layout (one
folder per subject and ``prompts_and_classes.txt``): the subject's class word becomes the
superclass and its prompt set (object or live) the validation prompts. ``concept_dir:
demo`` uses the synthetic demo concept (made procedurally, no downloads).

Batches are dicts: ``pixel_values`` (B, 3, H, W) in [-1, 1]; ``masks`` (B, 1, H, W) in
{0, 1} (all ones without masks); ``templates`` (prompt templates with one ``{}`` slot:
the module writes its concept phrase into instance templates and the superclass word
into prior templates); ``is_prior`` (B,) bool; ``cache_keys`` (a key per example when its
pixels are deterministic, so the module may cache its VAE latents, else ``""``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from components.errors import UserError
from components.pixels import IMAGE_SUFFIXES, MASK_SUFFIX, SIGNED, pil_to_tensor, to_rgb  # noqa: F401 - re-exported
from datamodules.sources import resolve_source
from datamodules.prompts import dreambooth_prompts, prompt_set_for_class, read_dreambooth_classes, read_prompt_file

PROMPTS_FILE = "prompts.txt"  # optional: a concept folder's own validation prompt set


class ConceptDataError(UserError):
    """Bad concept data, reported before any training starts."""


@dataclass
class ConceptImage:
    path: Path
    image: Image.Image  # RGB
    mask: Image.Image | None  # L, same size


def _is_mask(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def load_concept_folder(folder: str | Path, min_size: int = 0, require_masks: bool = False) -> list[ConceptImage]:
    """Read and check a concept folder; every problem raises :class:`ConceptDataError`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConceptDataError(f"Concept folder {folder} does not exist. Pass a folder of concept images (jpg, png, webp, bmp).")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = [p for p in files if not _is_mask(p)]
    masks = {p.stem[: -len(MASK_SUFFIX)]: p for p in files if _is_mask(p)}
    if not images:
        raise ConceptDataError(
            f"Concept folder {folder} holds no images: expected files ending in {', '.join(IMAGE_SUFFIXES)}."
        )
    stems = {p.stem for p in images}
    orphans = sorted(str(masks[s]) for s in masks if s not in stems)
    if orphans:
        raise ConceptDataError(
            f"Mask(s) with no image: {', '.join(orphans)}. A mask '<name>_mask.png' belongs to an image '<name>.<ext>' "
            "in the same folder; rename or remove the mask."
        )
    out = []
    for path in images:
        image = to_rgb(_open(path))
        if min(image.size) < min_size:
            raise ConceptDataError(
                f"Image {path} is {image.size[0]}x{image.size[1]}, smaller than the training resolution {min_size} on its "
                "short side. Use larger images, a smaller resolution, or set allow_upscale: true."
            )
        mask = None
        if path.stem in masks:
            mask = to_rgb(_open(masks[path.stem])).convert("L")
            if mask.size != image.size:
                raise ConceptDataError(
                    f"Mask {masks[path.stem]} is {mask.size[0]}x{mask.size[1]} but its image {path} is "
                    f"{image.size[0]}x{image.size[1]}: a mask must have the size of its image."
                )
        elif require_masks:
            raise ConceptDataError(
                f"Masks were asked for (use_masks: true) but image {path} has none: add {path.stem}{MASK_SUFFIX}.png "
                "(white = subject) or set use_masks: false."
            )
        out.append(ConceptImage(path, image, mask))
    return out


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (UnidentifiedImageError, OSError) as err:
        raise ConceptDataError(f"Cannot read image {path}: {err}. Remove or replace the file.") from err


# --------------------------------------------------------------------------- transforms


def _resize_crop(img: Image.Image, size: int, top: float, left: float, resample) -> Image.Image:
    """Resize the short side to ``size``, then crop a ``size`` square at (top, left) in [0, 1]."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample=resample)
    x, y = round((nw - size) * left), round((nh - size) * top)
    return img.crop((x, y, x + size, y + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1] (what the denoiser trains on)."""
    return pil_to_tensor(img, value_range=SIGNED)


class ConceptDataset(Dataset):
    """Concept images (repeated ``repeats`` times), each paired with a prior image if any."""

    def __init__(
        self,
        images: list[ConceptImage],
        template: str,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        prior: list[ConceptImage] | None = None,
        prior_template: str = "a photo of {}",
        seed: int = 0,
    ):
        self.images, self.template, self.resolution = images, template, resolution
        self.center_crop, self.random_flip, self.repeats = center_crop, random_flip, repeats
        self.prior, self.prior_template, self.seed = prior or [], prior_template, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def _rng(self, index: int, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, salt])

    def _example(self, item: ConceptImage, index: int, salt: int) -> dict:
        rng = self._rng(index, salt)
        top, left = (0.5, 0.5) if self.center_crop else (rng.random(), rng.random())
        flip = bool(self.random_flip and rng.random() < 0.5)
        img = _resize_crop(item.image, self.resolution, top, left, Image.BICUBIC)
        mask = item.mask if item.mask is not None else Image.new("L", item.image.size, 255)
        mask = _resize_crop(mask, self.resolution, top, left, Image.NEAREST)
        if flip:
            img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        key = f"{item.path}|{self.resolution}|flip={flip}" if self.center_crop else ""
        return {
            "pixel_values": to_tensor(img),
            "masks": torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))[None],
            "cache_keys": key,
        }

    def __getitem__(self, index: int) -> dict:
        ex = self._example(self.images[index % len(self.images)], index, 0)
        ex["templates"], ex["is_prior"] = self.template, False
        if self.prior:
            pr = self._example(self.prior[index % len(self.prior)], index, 1)
            pr["templates"], pr["is_prior"] = self.prior_template, True
            ex["prior"] = pr
        return ex


def collate(examples: list[dict]) -> dict:
    """Instance examples first, then their prior examples (DreamBooth's batch layout)."""
    flat = examples + [ex["prior"] for ex in examples if "prior" in ex]
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in flat]),
        "masks": torch.stack([e["masks"] for e in flat]),
        "templates": [e["templates"] for e in flat],
        "is_prior": torch.tensor([e["is_prior"] for e in flat]),
        "cache_keys": [e["cache_keys"] for e in flat],
    }


class EpochSeededSampler(DistributedSampler):
    """A shuffle that depends only on (seed, epoch), sharded over the ranks of a
    distributed run, so a resumed run sees the same order.

    Each epoch is a permutation of ``(seed, epoch)``, padded to a multiple of
    ``num_replicas`` and dealt out ``rank::num_replicas`` (as ``DistributedSampler``; being
    one, Lightning does not wrap it in another). ``skip(n)`` starts the next iteration
    ``n`` indices into this rank's share: how :class:`ResumableLoader` resumes mid-epoch.
    """

    def __init__(self, dataset: ConceptDataset, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0):
        # not DistributedSampler.__init__: it would ask torch.distributed for the ranks
        self.dataset, self.seed, self.shuffle, self.epoch = dataset, seed, shuffle, 0
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, False
        self.num_samples = math.ceil(len(dataset) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.epoch = epoch

    def skip(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        order += order[: self.total_size - n]  # pad: every rank takes as many steps
        mine = order[self.rank : self.total_size : self.num_replicas]
        start, self._skip = self._skip, 0
        return iter(mine[start:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints mid-epoch (its resumable-loader protocol:
    ``state_dict`` / ``load_state_dict``): it counts the batches it handed out this epoch,
    and a run resumed from the checkpoint starts the same epoch after them, so training
    continues exactly as if never stopped. Lightning does not prefetch from a loader with
    a length, so batches handed out are batches trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume: dict | None = None

    def __iter__(self):
        sampler, skip = self.sampler, 0
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            skip = min(self._resume["batches"], len(self))
            sampler.skip(skip * self.batch_size)
        self._resume, self._served = None, skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
        self.sampler.set_epoch(state["epoch"])  # Lightning sets it again before iterating


class ConceptDataModule(L.LightningDataModule):
    """One concept for any fine-tuning method.

    Args:
        concept_dir: folder of concept images (+ optional ``<name>_mask.png`` masks and
            ``prompts.txt``), ``"demo"`` for the synthetic demo concept, or
            ``"miniworld:<concept>"`` for a MiniWorld personal concept (5 views in one
            shared scene; ``"miniworld:<concept>:<context>:<views>"`` picks the context,
            ``scene``, ``prop`` or ``varied``, and/or the number of views, e.g.
            ``miniworld:green_dotted_cube:varied:6``). Leave unset with ``dreambooth_root``.
        dreambooth_root: a DreamBooth-layout dataset root (one folder per subject and
            ``prompts_and_classes.txt``); with ``subject``.
        subject: the subject folder name under ``dreambooth_root``, e.g. ``"dog"``.
        placeholder: the token standing for the concept (``"sks"``, ``"<my-dog>"``).
        superclass: the concept's class word (``"dog"``). Filled from the DreamBooth
            classes file for a DreamBooth subject.
        instance_template: training prompt template; ``{}`` takes the method's concept
            phrase (e.g. ``"sks dog"``).
        resolution: training image size (square).
        center_crop: center crop after resizing the short side; else a random crop.
        random_flip: horizontal flip with probability 0.5.
        repeats: how many times each image appears per epoch.
        allow_upscale: accept images smaller than ``resolution`` (they are upscaled).
        use_masks: require a mask for every image (masked loss).
        class_dir: prior-preservation class images; generated there if
            ``num_class_images`` exceeds what it holds and ``class_model`` is set. A
            ``{}`` in it takes the superclass word (``outputs/class_images/{}``).
        num_class_images: how many class images to use (0: no prior preservation).
        class_template: prompt template of class images; ``{}`` takes the superclass.
        class_model: base model (hub id, folder, ``"tiny"``) that generates missing class
            images once, cached in ``class_dir``.
        class_guidance, class_steps: guidance scale and DDIM steps for class generation.
        validation_prompts: ``"auto"`` (the concept folder's ``prompts.txt`` if any, else
            the DreamBooth set fitting the superclass),
            ``"object"``, ``"live"``, a file with one template per line, or a list.
        num_validation_prompts: how many of them validation callbacks use (0: all).
        batch_size: concept images per step (each paired with a class image if any).
        num_workers: data loader workers.
        seed: seed of crops, flips and shuffling. None (the default): train.py's
            ``seed_everything`` (0 outside it).
    """

    def __init__(
        self,
        concept_dir: str | None = None,
        dreambooth_root: str | None = None,
        subject: str | None = None,
        placeholder: str = "sks",
        superclass: str | None = None,
        instance_template: str = "a photo of {}",
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        allow_upscale: bool = False,
        use_masks: bool = False,
        class_dir: str | None = None,
        num_class_images: int = 0,
        class_template: str = "a photo of {}",
        class_model: str | None = None,
        class_guidance: float = 7.5,
        class_steps: int = 50,
        validation_prompts: str | list[str] = "auto",
        num_validation_prompts: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int | None = None,
    ):
        super().__init__()
        for name, value in (("repeats", repeats), ("batch_size", batch_size), ("resolution", resolution)):
            if value < 1:
                raise ConceptDataError(f"data.{name} is {value}: it must be 1 or more (repeats: times each image "
                                       "appears per epoch; batch_size: images per step; resolution: image size).")
        if num_class_images < 0 or num_workers < 0:
            raise ConceptDataError("data.num_class_images and data.num_workers must be 0 or more.")
        if concept_dir is not None and (dreambooth_root is not None or subject is not None):
            given = f"subject {subject!r}" + (f" of {dreambooth_root}" if dreambooth_root is not None else "")
            raise ConceptDataError(
                f"Both a concept folder (concept_dir: {concept_dir}) and a DreamBooth {given} are given: which "
                "images should train?",
                fix="layer one data config: for your folder drop configs/data/dreambooth_*.yaml (or add --data.subject "
                    "null --data.dreambooth_root null); for the DreamBooth subject drop --data.concept_dir")
        if subject is not None and dreambooth_root is None:
            raise ConceptDataError(f"subject {subject!r} is set but dreambooth_root is not",
                                   fix="set --data.dreambooth_root to the DreamBooth dataset folder (one folder per "
                                       "subject + prompts_and_classes.txt)")
        if dreambooth_root is not None:
            if subject is None:
                raise ConceptDataError("dreambooth_root is set but subject is not: name a subject folder, e.g. subject: dog.")
            classes = read_dreambooth_classes(dreambooth_root)
            if subject not in classes:
                raise ConceptDataError(
                    f"Subject {subject!r} is not in {dreambooth_root}/prompts_and_classes.txt; known: {', '.join(sorted(classes))}."
                )
            superclass = superclass or classes[subject]
            concept_dir = str(Path(dreambooth_root) / subject)
        if concept_dir is None:
            raise ConceptDataError("No concept images: set concept_dir (a folder, or 'demo') or dreambooth_root + subject.")
        source = resolve_source(concept_dir)  # "demo", "miniworld:<concept>", ... (datamodules.sources)
        if source is not None:
            concept_dir, superclass = source.folder, superclass or source.superclass
        if superclass is None or not superclass.strip():
            raise ConceptDataError(
                "The superclass word is empty: set superclass to the concept's class word, e.g. superclass: dog."
            )
        if not placeholder or not placeholder.strip() or " " in placeholder.strip():
            raise ConceptDataError(f"Placeholder {placeholder!r} must be one non-empty word, e.g. 'sks' or '<my-dog>'.")
        if "{}" not in instance_template or "{}" not in class_template:
            raise ConceptDataError("instance_template and class_template need a '{}' slot for the subject, e.g. 'a photo of {}'.")
        if class_dir is not None and "{}" in class_dir:
            class_dir = class_dir.replace("{}", superclass.strip())  # a folder per class word
        if num_class_images > 0 and class_dir is None:
            raise ConceptDataError("num_class_images > 0 needs class_dir: a folder of class images, or where to generate them.")
        if placeholder.strip().lower() == superclass.strip().lower():
            warnings.warn(f"The placeholder {placeholder!r} is the superclass word: the concept phrase reads "
                          f"'{placeholder.strip()} {superclass.strip()}' and cannot tell the concept from its class. Choose a "
                          "rare identifier, e.g. placeholder: sks.", stacklevel=2)
        self.concept_dir = concept_dir
        self.class_dir = class_dir  # resolved ({} filled); hparams keep what was given
        self.placeholder = placeholder.strip()
        self.superclass = superclass.strip()
        # the resolved placeholder and superclass are linked into (and logged by) the model
        self.save_hyperparameters(ignore=["placeholder", "superclass"])
        self.hparams["seed"] = 0 if seed is None else int(seed)
        # Read and check everything now, so bad input fails before a model is loaded.
        self.concept_images = load_concept_folder(
            concept_dir, min_size=0 if allow_upscale else resolution, require_masks=use_masks
        )
        self.has_masks = any(c.mask is not None for c in self.concept_images)
        self.validation_templates = self._validation_templates(validation_prompts, num_validation_prompts)
        self.class_images: list[ConceptImage] = []

    def _validation_templates(self, spec: str | list[str], limit: int) -> list[str]:
        own = Path(self.concept_dir) / PROMPTS_FILE
        if isinstance(spec, list):
            templates = spec
        elif spec == "auto" and own.exists():
            templates = read_prompt_file(own)  # the concept folder's own prompt set
        elif spec == "auto":
            templates = dreambooth_prompts(prompt_set_for_class(self.superclass))
        elif spec in ("object", "live"):
            templates = dreambooth_prompts(spec)
        else:
            templates = read_prompt_file(spec)
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise ConceptDataError(f"Validation prompt(s) without a '{{}}' slot for the subject: {bad[:3]}.")
        return templates[:limit] if limit > 0 else templates

    # ------------------------------------------------------------------ class images

    def prepare_data(self) -> None:
        """Generate missing prior-preservation class images once (rank 0 only)."""
        n = self.hparams.num_class_images
        if n <= 0:
            return
        folder = Path(self.class_dir)
        have = _list_images(folder)
        if len(have) >= n:
            return
        if self.hparams.class_model is None:
            raise ConceptDataError(
                f"class_dir {folder} holds {len(have)} images but num_class_images is {n}: add images or set class_model "
                "to generate the missing ones with a base model."
            )
        from datamodules.class_images import generate_class_images

        generate_class_images(
            self.hparams.class_model, folder, prompt=self.hparams.class_template.format(self.superclass),
            num_images=n, start=len(have), guidance=self.hparams.class_guidance, steps=self.hparams.class_steps,
            resolution=self.hparams.resolution, seed=self.hparams.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.num_class_images > 0 and not self.class_images:
            self.class_images = load_concept_folder(self.class_dir, min_size=0)[: hp.num_class_images]
        self.train_set = ConceptDataset(
            self.concept_images, hp.instance_template, hp.resolution, hp.center_crop, hp.random_flip, hp.repeats,
            prior=self.class_images, prior_template=hp.class_template, seed=hp.seed,
        )
        # Validation loss: every concept image once, no augmentation.
        self.val_set = ConceptDataset(self.concept_images, hp.instance_template, hp.resolution, True, False, 1, seed=hp.seed)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer  # None outside a Trainer: one process
        ranks = dict(num_replicas=trainer.world_size, rank=trainer.global_rank) if trainer is not None else {}
        sampler = EpochSeededSampler(self.train_set, self.hparams.seed, **ranks)
        return ResumableLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate,
                               num_workers=self.hparams.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.concept_images) * self.hparams.repeats / self.hparams.batch_size)

    def fingerprint(self) -> str:
        """A short hash of the concept images, e.g. to key cached embeddings."""
        h = hashlib.sha256()
        for c in self.concept_images:
            h.update(c.path.name.encode())
            h.update(c.image.tobytes())
        return h.hexdigest()[:16]


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not _is_mask(p))
