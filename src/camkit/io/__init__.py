"""Input and output at the edges: images, preprocessing, the model zoo."""

from camkit.io.annotations import Annotation, read_annotations
from camkit.io.images import SAMPLES, load_image, sample_image, to_rgb
from camkit.io.models import DEFAULT_MODEL, LoadedModel, load_model
from camkit.io.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, imagenet_labels

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAMPLES",
    "Annotation",
    "LoadedModel",
    "Preprocess",
    "imagenet_labels",
    "load_image",
    "load_model",
    "read_annotations",
    "sample_image",
    "to_rgb",
]
