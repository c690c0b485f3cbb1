"""Subject segmentation, pluggable: ``segmenter(images, word) -> masks``.

images (B, 3, H, W) in [0, 1]; word: the subject's noun ("ball"); masks (B, 1, H, W)
bool. Three segmenters:

* :class:`AttentionSegmenter` (``"attention"``, the default, no extra model): the word's
  cross-attention map in the diffusion model itself. The image is encoded, noised to a
  few mid timesteps (fixed seeds), and one UNet call per timestep under "a {word}" reads
  the word's map (softmax(QKᵀ/√d), mean over heads, upsampled, mean over layers and
  timesteps); the mask is the map above its Otsu threshold.
* :class:`GroundedSAMSegmenter` (``"grounded-sam"``): transformers' Grounding-DINO finds
  the word's box, SAM segments inside it — what the paper uses. Weights by hub id or
  folder (``grounding_model`` / ``sam_model``); without them a clear error naming both.
  Not tested here: no weights can be downloaded where this project is built.
* :class:`KnownMasks` (``"known"``): masks the caller already has (MiniWorld's ground
  truth, a concept folder's ``*_mask.png``), matched by image content.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from components.errors import UserError
from components.personalized import word_token_positions
from components.attention import AttentionControl, _layer_size, attention_control
from components.pixels import tensor_to_pil, to_uint8


class Segmenter(Protocol):
    def __call__(self, images: torch.Tensor, word: str) -> torch.Tensor: ...


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of a 1-D tensor of values (the split maximising between-class variance)."""
    v = values.float().flatten()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return hi
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centers = lo + (torch.arange(bins, dtype=torch.float32) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centers).cumsum(0) / w0.clamp_min(1e-12)
    m1 = ((hist * centers).sum() - (hist * centers).cumsum(0)) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    k = int(between[:-1].argmax())
    return float(lo + (k + 1) * (hi - lo) / bins)


class _WordMaps(AttentionControl):
    """Mean over cross-attention layers of the weighted columns' map, at a given size."""

    def __init__(self, weights: torch.Tensor, size: tuple[int, int]):
        super().__init__(1)
        self.weights, self.size = weights, size
        self.total, self.layers = None, 0

    def wants(self, is_cross: bool) -> bool:
        return is_cross

    def edit_attention(self, q, k, v, out, is_cross: bool, scale: float) -> None:
        probs = self.probs(q, k, slice(None), scale)  # (B, H, P, S)
        m = (probs * self.weights.to(probs.device)[:, None, None, :]).sum(-1).mean(1)  # (B, P)
        h, w = _layer_size(m.shape[1], self.size)
        m = F.interpolate(m.view(-1, 1, h, w), size=self.size, mode="bilinear", align_corners=False)
        self.total = m if self.total is None else self.total + m
        self.layers += 1


class AttentionSegmenter:
    """The word's cross-attention map in the model (see the module docstring).

    ``fractions``: the noise levels, as fractions of the training timesteps (0.3, 0.5,
    0.7: mid-trajectory, where maps follow the object's layout; our choice, the paper uses
    Grounded-SAM); ``prompt``: the template read, its ``{}`` taking the word.
    """

    def __init__(self, model, fractions: Sequence[float] = (0.3, 0.5, 0.7), prompt: str = "a {}", seed: int = 0):
        self.model, self.fractions, self.prompt, self.seed = model, tuple(fractions), prompt, seed
        self.rows = 0  # UNet rows evaluated

    @torch.no_grad()
    def maps(self, images: torch.Tensor, word: str, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, 1, H, W) attention maps of ``word`` (in ``prompts``, default "a {word}")."""
        from editing.inversion import encode_images

        c = self.model.components
        unet = c.unet
        b = images.shape[0]
        prompts = list(prompts) if prompts is not None else [self.prompt.format(word)] * b
        tokens = [self.model.prompt_tokens(p) for p in prompts]
        weights = torch.zeros(b, len(tokens[0]))
        for j, p in enumerate(prompts):
            pos = word_token_positions(c.tokenizer, p, word)
            weights[j, pos] = 1.0 / len(pos)
        cond = self.model.encode_prompts(prompts)
        cond = getattr(cond, "hidden_states", cond).to(unet.device, unet.dtype)
        x0 = encode_images(c, images)
        gen = torch.Generator().manual_seed(self.seed)
        control = _WordMaps(weights, tuple(x0.shape[-2:]))
        sched = c.ddim_scheduler()
        with attention_control(unet, control):
            for f in self.fractions:
                t = int(f * (sched.config.num_train_timesteps - 1))
                noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
                xt = sched.add_noise(x0, noise, torch.tensor([t]))
                c.predict(xt, torch.tensor(t, device=unet.device), cond)
                self.rows += b
        if control.total is None:
            raise RuntimeError("the model has no cross-attention layers to read a map from")
        m = control.total / control.layers
        return F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def __call__(self, images: torch.Tensor, word: str, prompts: Sequence[str] | None = None) -> torch.Tensor:
        maps = self.maps(images, word, prompts)
        return torch.stack([m > otsu_threshold(m) for m in maps])


class KnownMasks:
    """Masks known beforehand (ground truth), looked up by the image's content."""

    def __init__(self, images: torch.Tensor | None = None, masks: torch.Tensor | None = None, fallback=None):
        self.table: dict[str, torch.Tensor] = {}
        self.fallback = fallback
        if images is not None:
            for image, mask in zip(images, masks):
                self.add(image, mask)

    @staticmethod
    def key(image: torch.Tensor) -> str:
        return hashlib.sha1(to_uint8(image.float()[None]).tobytes()).hexdigest()  # the 8-bit image's bytes

    def add(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        self.table[self.key(image)] = mask.bool().reshape(1, *image.shape[-2:])

    def __call__(self, images: torch.Tensor, word: str, prompts=None) -> torch.Tensor:
        out = []
        for image in images:
            mask = self.table.get(self.key(image))
            if mask is None:
                if self.fallback is None:
                    raise KeyError("no known mask for this image (KnownMasks holds only the images it was given)")
                mask = self.fallback(image[None], word)[0]
            out.append(mask)
        return torch.stack(out)


class GroundedSAMSegmenter:
    """Grounding-DINO (text → box) + SAM (box → mask), through transformers.

    Defaults are the hub ids of the public checkpoints; pass local folders offline."""

    def __init__(self, grounding_model: str = "IDEA-Research/grounding-dino-tiny", sam_model: str = "facebook/sam-vit-base",
                 box_threshold: float = 0.3, device: str | torch.device | None = None):
        try:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor
        except ImportError as err:  # an old transformers
            raise UserError("Grounded-SAM needs transformers with Grounding-DINO and SAM (4.40 or newer)",
                            fix="upgrade transformers, or use segmenter 'attention'") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            self.det_processor = AutoProcessor.from_pretrained(grounding_model, local_files_only=offline)
            self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(grounding_model, local_files_only=offline)
            self.sam_processor = SamProcessor.from_pretrained(sam_model, local_files_only=offline)
            self.sam = SamModel.from_pretrained(sam_model, local_files_only=offline)
        except (OSError, ValueError) as err:
            raise UserError(
                f"Grounded-SAM weights could not be loaded (Grounding-DINO {grounding_model!r}, SAM {sam_model!r}): {err}",
                fix="download them once (huggingface-cli download IDEA-Research/grounding-dino-tiny facebook/sam-vit-base) "
                    "or pass local folders as grounding_model / sam_model; or use segmenter 'attention'",
            ) from err
        self.device = torch.device(device or "cpu")
        self.detector.to(self.device).eval()
        self.sam.to(self.device).eval()
        self.box_threshold = box_threshold

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, word: str, prompts=None) -> torch.Tensor:
        out = []
        for image in images:
            pil = tensor_to_pil(image)
            inputs = self.det_processor(images=pil, text=f"{word}.", return_tensors="pt").to(self.device)
            det = self.detector(**inputs)
            boxes = self.det_processor.post_process_grounded_object_detection(
                det, inputs.input_ids, threshold=self.box_threshold, target_sizes=[pil.size[::-1]])[0]["boxes"]
            if len(boxes) == 0:
                out.append(torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
                continue
            box = boxes[0].tolist()
            sam_in = self.sam_processor(pil, input_boxes=[[box]], return_tensors="pt").to(self.device)
            sam_out = self.sam(**sam_in, multimask_output=False)
            masks = self.sam_processor.image_processor.post_process_masks(
                sam_out.pred_masks.cpu(), sam_in["original_sizes"].cpu(), sam_in["reshaped_input_sizes"].cpu())[0]
            out.append(masks[0, :1].bool())
        return torch.stack(out)


SEGMENTERS = ("attention", "grounded-sam", "known")


def build_segmenter(spec: str, model, **options) -> Segmenter:
    """``attention`` | ``grounded-sam`` (options: grounding_model, sam_model) | ``known``."""
    if spec == "attention":
        return AttentionSegmenter(model, **options)
    if spec == "grounded-sam":
        return GroundedSAMSegmenter(**options)
    if spec == "known":
        return KnownMasks(**options)
    raise UserError(f"unknown segmenter {spec!r}", fix=f"choose one of {', '.join(SEGMENTERS)}")
