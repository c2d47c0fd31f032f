"""Files at the edges: images (reading, samples), annotation files, and writing results safely."""

from camkit.io.annotations import Annotation, read_annotations
from camkit.io.images import SAMPLES, load_image, sample_image, to_rgb

__all__ = [
    "SAMPLES",
    "Annotation",
    "load_image",
    "read_annotations",
    "sample_image",
    "to_rgb",
]
