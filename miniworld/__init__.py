"""MiniWorld: a procedural world, and tiny models pretrained on it, where personalization
and the sampling study can run for real on a CPU and offline.

- :class:`World`: seeded images (32–64 px) of one object (shape x colour x pattern,
  shiny or wet) in one of 20 scenes, with DreamBooth-style captions and object masks.
- :data:`CONCEPTS`: objects held out of pretraining; :func:`write_concept` writes one as
  a concept folder for the concept DataModule; :data:`PROMPTS`: the 25 prompts.
- ``miniworld.pretrain.TextToImagePretraining`` + ``miniworld.data.MiniWorldDataModule``:
  text-to-image pretraining through ``train.py`` (``configs/miniworld/pretrain.yaml``).
- ``miniworld.encoders``: the tiny CLIP-like and DINO-like encoders of the metrics;
  ``miniworld.judge``: the attribute classifier; ``python -m miniworld.quality``. These and
  the VAE (``miniworld.vae``) train through one small loop, ``miniworld.loop.train``.

See miniworld/README.md for the models shipped in miniworld/pretrained and how they were made.
"""

from miniworld.concepts import PROMPTS, write_concept
from miniworld.world import CONCEPTS, HELD_OUT, Concept, ObjectSpec, Sample, World

__all__ = ["World", "Sample", "ObjectSpec", "Concept", "CONCEPTS", "HELD_OUT", "PROMPTS", "write_concept"]
