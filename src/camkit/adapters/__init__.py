"""Models in: the model zoo (timm, torchvision, a local file, the offline pretrained default), their
preprocessing and labels, and the adapters for models that are not plain 2-D PyTorch classifiers (Keras 3 models,
3-D video models). A new kind of model (a model hub, a detector family) gets its adapter module here."""

from camkit.adapters.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, imagenet_labels
from camkit.adapters.zoo import DEFAULT_MODEL, LoadedModel, load_model

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "Preprocess",
    "imagenet_labels",
    "load_model",
]
