"""CLIP-I, CLIP-T and DINO metrics (torchmetrics), their backbones and the real-image cache
(MiniWorld's ground-truth identity / prompt accuracy: :mod:`miniworld.metrics`)."""

from metrics.backbones import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    DINOV2_SMALL,
    ClipBackbone,
    DinoBackbone,
    ImageBackbone,
    load_clip_backbone,
    load_dino_backbone,
)
from metrics.concept import JUDGE_METRIC_NAMES, METRIC_NAMES, ConceptMetrics
from metrics.preprocess import ImagePreprocess
from metrics.reference import ReferenceCache, load_images
from metrics.similarity import CLIPImageSimilarity, CLIPTextSimilarity, DINOSimilarity, ImageSimilarity, clip_t_text
from metrics.tiny import save_tiny_clip, save_tiny_dino, tiny_backbone_folder

__all__ = [
    "DEFAULT_CLIP", "DEFAULT_DINO", "DINOV2_SMALL", "METRIC_NAMES", "JUDGE_METRIC_NAMES",
    "ClipBackbone", "DinoBackbone", "ImageBackbone", "ImagePreprocess",
    "load_clip_backbone", "load_dino_backbone",
    "CLIPImageSimilarity", "CLIPTextSimilarity", "DINOSimilarity", "ImageSimilarity", "clip_t_text",
    "ConceptMetrics", "ReferenceCache", "load_images",
    "save_tiny_clip", "save_tiny_dino", "tiny_backbone_folder",
]
