"""HiFi Tuner's reference-guided generation (§3.3, Algorithm 2), around any guide-based sampler.

Per image (x_T fixed by the cell, as for every sampler):

1. I_g1: the base sampler (default ``concept``, ω = 7.5 here) from x_T with the model's
   conditioning (step-wise c_s^t for HiFi Tuner). x_{t_s} of this pass is kept: the
   second pass is identical up to t_s, so it restarts there.
2. M_g = segmenter(I_g1, superclass); the reference I_r is the concept image with the
   highest DINO cosine to I_g1; M_r its mask (the concept folder's ``*_mask.png``, else
   the segmenter).
3. Algorithm 4 aligns M_r to M_g (editing.align); T(I_r) is inverted with its caption c_r
   (eq. 3, guidance 1): [x_0*, …, x_T*]. M = T(M_r) at latent size.
4. From x_{t_s}: x_t[M] = x_t*[M]; for t_s ≥ t ≥ t_e: x_{t−1} = F(x_t, [c, c_s^t], φ), then
   φ_h takes J Adam steps (lr 1e-2) on eq. 10, ‖x*_{t−1}[M] − F(x_t, [c, c_s^t], φ_h)[M]‖²,
   and x_{t−1}[M] = F(x_t, [c, c_s^t], φ_h)[M]. φ_h starts as φ at t_s and carries over
   from step to step; each step's Adam starts afresh (as null-text inversion's does).

Defaults from the paper's §4: t_s = 40, t_e = 10 of 50 DDIM steps, J = 10, Adam lr 1e-2.
t_s and t_e count denoising steps down from num_steps (t = num_steps … 1), as the paper's t.

Reference images come from ``references`` (a concept folder, or ``miniworld:<concept>``),
or from the concept the caller evaluates (evaluate.py's subject, the training
DataModule's concept folder: :meth:`use_concept`). Captions c_r: ``caption`` (one for
every reference; ``{}`` takes the superclass), else the folder's ``captions.txt``
(``<file>: <caption>`` per line) or ``concept.json`` (``captions``, or MiniWorld's
``scenes``), else BLIP-2 (``captioner``: a transformers hub id or folder), else an error.

Cost: UNet rows of both passes, the inversion, the segmenter and every optimizer step's
forward, per image (``unet_evals_per_image``); ``optimizer_steps_per_image`` J·(t_s − t_e + 1).
Works on SD 1.x/2.x layouts (and MiniWorld); other backbones get a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from components.errors import UserError
from samplers.base import UNCOND, Run, Sampler, _check_model, decode
from samplers.registry import SAMPLERS, build_sampler, register


@register
class ReferenceGuidedSampler(Sampler):
    name = "reference_guided"
    #: the sweep planner cannot share this sampler's work (decoding, segmentation, inversion mid-run)
    plannable = False
    #: it reads the concept's source images, not only the model (samplers.model_only_samplers leaves it out)
    needs_concept_images = True

    def __init__(self, num_steps: int = 50, base: str = "concept", base_settings: dict | None = None,
                 t_s: int = 40, t_e: int = 10, inner_steps: int = 10, lr: float = 1e-2,
                 references: str | None = None, caption: str | None = None, captioner: str | None = None,
                 segmenter: str = "attention", dino: str = "auto", align_steps: int = 100):
        super().__init__(num_steps)
        self.base, self.base_settings = base, dict(base_settings or {"guidance": 7.5})
        if base == self.name or base not in SAMPLERS:
            raise ValueError(f"{self.name}: base={base!r} must be another sampler: {', '.join(n for n in SAMPLERS if n != self.name)}")
        self.base_sampler = build_sampler(base, num_steps=num_steps, **self.base_settings)
        if type(self.base_sampler).step is not Sampler.step:
            raise ValueError(f"{self.name}: base={base!r} has its own step (a second trajectory or a fusion step); "
                             "reference guidance wraps samplers whose step is one guided DDIM update: "
                             "concept, superclass, mixed, switching, multistage, masked")
        self.t_s, self.t_e = self.check_step("t_s", t_s), self.check_step("t_e", t_e)
        if not 1 <= t_e <= t_s:
            raise ValueError(f"{self.name}: need 1 <= t_e <= t_s (got t_s={t_s}, t_e={t_e}); the paper: t_s=40, t_e=10 of 50")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"{self.name}: inner_steps={inner_steps!r} must be an integer >= 0 (J, the paper: 10)")
        if not lr > 0:
            raise ValueError(f"{self.name}: lr={lr!r} must be > 0 (the paper: 1e-2)")
        from editing.segmentation import SEGMENTERS

        if segmenter not in SEGMENTERS or segmenter == "known":
            raise ValueError(f"{self.name}: segmenter={segmenter!r}; choose 'attention' or 'grounded-sam'")
        self.inner_steps, self.lr = inner_steps, float(lr)
        self.references, self.caption, self.captioner = references, caption, captioner
        self.segmenter, self.dino, self.align_steps = segmenter, dino, align_steps
        self._concept: str | None = None  # folder given by the caller (use_concept)
        self._cache: dict = {}
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ references

    def use_concept(self, folder) -> None:
        """The concept folder of the subject being sampled (when ``references`` is unset)."""
        if folder is not None and str(folder) != self._concept:
            self._concept, self._cache = str(folder), {}

    def reference_folder(self) -> Path:
        spec = self.references or self._concept
        if spec is None:
            raise UserError(f"{self.name} needs the concept's source images",
                            fix="set references to the concept folder (e.g. --set references=concepts/dog or "
                                "references=miniworld:blue_striped_star)")
        from datamodules.sources import resolve_source

        source = resolve_source(spec)  # "demo", "miniworld:<concept>": as the concept DataModule reads them
        return Path(source.folder if source is not None else spec)

    def check_ready(self) -> None:
        """Check what needs no model: the reference folder and a source of captions."""
        from datamodules.concept import load_concept_folder

        folder = self.reference_folder()
        items = load_concept_folder(folder)
        if not self.captioner:
            reference_captions(folder, [c.path for c in items], "{}", self.caption, None)

    def load_references(self, model) -> dict:
        key = ("refs", id(model))
        if key in self._cache:
            return self._cache[key]
        from components.pixels import SIGNED, pil_to_tensor, signed_to_unit
        from datamodules.concept import load_concept_folder

        folder = self.reference_folder()
        items = load_concept_folder(folder)
        size = model.components.unet.config.sample_size * (2 ** (len(model.components.vae.config.block_out_channels) - 1))
        # [0, 1] through [-1, 1], as they always were read (x / 255 differs in the last bit)
        images = torch.stack([_resize(signed_to_unit(pil_to_tensor(c.image, SIGNED)), size) for c in items])
        masks = [None if c.mask is None else _resize(signed_to_unit(pil_to_tensor(c.mask.convert("RGB"), SIGNED))[:1], size) > 0.5
                 for c in items]
        captions = reference_captions(folder, [c.path for c in items], model.superclass, self.caption, self.captioner, images)
        refs = {"images": images, "masks": masks, "captions": captions, "folder": folder}
        self._cache[key] = refs
        return refs

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def sample_cells(self, model, cells, seed: int = 0, batch_size: int = 8, progress: bool = False):
        _check_model(model)
        from editing.inversion import check_editable

        check_editable(model)
        self.load_references(model)  # fails (no references, no captions) before any sampling
        self.optimizer_steps = 0
        out = super().sample_cells(model, cells, seed, batch_size, progress)
        out.cost["optimizer_steps_per_image"] = self.optimizer_steps / max(len(cells), 1)
        return out

    def run_loop(self, run: Run, on_step=None) -> torch.Tensor:
        from editing.align import optimize_transform, warp, warp_mask
        from editing.inversion import Denoiser, ddim_step, encode_images, invert

        model, base, n = run.model, self.base_sampler, self.num_steps
        i_s, i_e = n - self.t_s, n - self.t_e
        timesteps = run.scheduler.timesteps
        # 1. I_g1 with the base sampler; x_{t_s} kept (the second pass is the same up to there)
        with base.attention(run):
            z = run.x_T
            for i, t in enumerate(timesteps):
                if i == i_s:
                    z_ts = z.clone()
                z = base.step(run, i, t, z)
                if on_step is not None:
                    on_step(run.batch)
        vae = run.components.vae
        images = decode(vae, z).float()  # (B, 3, H, W)
        # 2. masks and references
        refs = self.load_references(model)
        segment = self._segmenter(model)
        m_g = segment(images, model.superclass).cpu()  # (B, 1, H, W)
        dino = self._dino(model)
        e_g = dino.embed_images(images.to(dino.device))
        if ("dino_refs", id(model)) not in self._cache:
            self._cache[("dino_refs", id(model))] = dino.embed_images(refs["images"].to(dino.device))
        pick = (e_g @ self._cache[("dino_refs", id(model))].T).argmax(1).tolist()  # nearest source image by DINO
        ref_masks = [self._reference_mask(model, segment, refs, r) for r in pick]
        warped, warped_masks = [], []
        for b, r in enumerate(pick):
            align = optimize_transform(ref_masks[b], m_g[b], steps=self.align_steps)  # Algorithm 4
            warped.append(warp(refs["images"][r][None], align.matrix)[0])
            warped_masks.append(warp_mask(ref_masks[b][None].float(), align.matrix)[0])
        warped = torch.stack(warped)
        mask = F.interpolate(torch.stack(warped_masks).float(), size=run.latent_shape[1:], mode="area") > 0.5
        mask = mask.to(run.device)  # (B, 1, h, w): M_r* at latent size
        # 3. the reference trajectory [x_0*, ..., x_T*] (eq. 3), captions c_r
        d = Denoiser(model, n)
        traj = invert(d, encode_images(run.components, warped.to(run.device)), [refs["captions"][r] for r in pick])
        run.unet_rows += d.rows + getattr(segment, "rows", 0)
        if hasattr(segment, "rows"):
            segment.rows = 0
        run.state["reference"] = {"pick": pick, "mask": mask, "first_pass": images}
        # 4. the guided pass, from x_{t_s}
        z = torch.where(mask, traj[n - i_s].to(z_ts.dtype), z_ts)
        phi_h = None
        original = run.embeddings
        with base.attention(run):
            for i in range(i_s, n):
                t = timesteps[i]
                if i > i_e:
                    z = base.step(run, i, t, z)
                    continue
                z_plain = base.step(run, i, t, z)  # F(x_t, [c, c_s^t], φ)
                if phi_h is None:
                    phi_h = original(UNCOND, t).detach().float()  # φ_h = φ at t_s
                target = traj[n - i - 1]

                def with_phi(kind, t_, _phi=None):
                    return phi_h.to(run.dtype) if kind == UNCOND else original(kind, t_)

                run.embeddings = with_phi
                try:
                    if self.inner_steps:
                        phi_h = phi_h.detach().requires_grad_(True)
                        optimizer = torch.optim.Adam([phi_h], lr=self.lr)
                        denom = mask.float().sum().clamp_min(1) * z.shape[1]
                        for _ in range(self.inner_steps):
                            with torch.enable_grad():
                                x_prev = ddim_step(d.schedule, i, base.guide(run, i, t, z), z)
                                loss = ((x_prev.float() - target.float()).pow(2) * mask).sum() / denom  # eq. 10
                                optimizer.zero_grad()
                                loss.backward()
                            optimizer.step()
                            self.optimizer_steps += run.batch
                        phi_h = phi_h.detach()
                    x_h = ddim_step(d.schedule, i, base.guide(run, i, t, z), z)
                finally:
                    run.embeddings = original
                z = torch.where(mask, x_h.to(z.dtype), z_plain)
        return z

    # ------------------------------------------------------------------ parts

    def _segmenter(self, model):
        key = ("segmenter", id(model))
        if key not in self._cache:
            from editing.segmentation import build_segmenter

            options = {} if self.segmenter == "attention" else {"device": model.components.unet.device}
            self._cache[key] = build_segmenter(self.segmenter, model, **options)
        return self._cache[key]

    def _reference_mask(self, model, segment, refs, r: int) -> torch.Tensor:
        mask = refs["masks"][r]
        if mask is None:
            mask = segment(refs["images"][r][None].to(model.components.unet.device), model.superclass)[0].cpu()
            refs["masks"][r] = mask
        return mask

    def _dino(self, model):
        key = ("dino", id(model))
        if key not in self._cache:
            from metrics.backbones import DEFAULT_DINO, load_dino_backbone

            name = self.dino
            if name == "auto":
                source = str(getattr(model.components, "source", ""))
                name = str(Path(__file__).resolve().parents[1] / "miniworld/pretrained/dino") if "miniworld" in source else DEFAULT_DINO
            self._cache[key] = load_dino_backbone(name).to(model.components.unet.device).eval()
        return self._cache[key]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def reference_captions(folder: Path, paths, superclass: str, caption: str | None = None, captioner: str | None = None,
                       images: torch.Tensor | None = None) -> list[str]:
    """c_r of each reference image (see the module docstring for the order of sources)."""
    if caption:
        return [" ".join(caption.replace("{}", superclass).split())] * len(paths)
    folder = Path(folder)
    listed = folder / "captions.txt"
    if listed.exists():
        table = {}
        for line in listed.read_text().splitlines():
            name, sep, text = line.partition(":")
            if sep and text.strip():
                table[name.strip()] = text.strip()
        missing = [p.name for p in paths if p.name not in table and p.stem not in table]
        if missing:
            raise UserError(f"{listed} has no caption for {', '.join(missing[:3])}",
                            fix="add a line '<file name>: <caption>' for every concept image")
        return [table.get(p.name, table.get(p.stem)) for p in paths]
    meta_path = folder / "concept.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        from datamodules.sources import folder_captions

        captions = folder_captions(meta, superclass)  # "captions", else a source plugin's (MiniWorld: the scenes)
        if captions is not None and len(captions) == len(paths):
            return captions
    if captioner:
        return blip2_captions(captioner, images)
    raise UserError(f"no captions for the reference images in {folder}",
                    fix="set caption (one caption for all, '{}' takes the superclass), add captions.txt to the concept "
                        "folder ('<file name>: <caption>' per line), or set captioner to a BLIP-2 model "
                        "(e.g. Salesforce/blip2-opt-2.7b)")


@torch.no_grad()
def blip2_captions(name: str, images: torch.Tensor) -> list[str]:
    """BLIP-2 captions through transformers (weights by hub id or folder)."""
    try:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor
    except ImportError as err:
        raise UserError("BLIP-2 needs transformers' Blip2ForConditionalGeneration", fix="upgrade transformers") from err
    try:
        processor = Blip2Processor.from_pretrained(name)
        model = Blip2ForConditionalGeneration.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"BLIP-2 weights {name!r} could not be loaded: {err}",
                        fix="download them (huggingface-cli download Salesforce/blip2-opt-2.7b) or pass a local "
                            "folder; or give captions (caption setting, captions.txt)") from err
    from components.pixels import tensor_to_pil

    pil = [tensor_to_pil(im) for im in images]
    inputs = processor(images=pil, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=30)
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
