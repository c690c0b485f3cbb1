"""Training callbacks: image grids, artifact export, sampler validation with metrics."""

from callbacks.export import ExportArtifact
from callbacks.image_grid import ImageGridLogger
from callbacks.sampling import SamplerValidation

__all__ = ["ExportArtifact", "ImageGridLogger", "SamplerValidation"]
