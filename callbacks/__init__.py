"""Training callbacks: image grids, artifact export, sampler validation with metrics, weight EMA."""

from callbacks.ema import EMA
from callbacks.export import ExportArtifact
from callbacks.image_grid import ImageGridLogger
from callbacks.sampling import SamplerValidation

__all__ = ["EMA", "ExportArtifact", "ImageGridLogger", "SamplerValidation"]
