"""Hugging Face ``transformers`` image classifiers: ``hf:PATH_OR_ID``.

:func:`load` reads an ``AutoModelForImageClassification`` from a ``save_pretrained`` folder (offline: nothing is
downloaded) or from a hub id (which needs a network, or the model already in the local Hugging Face cache), and
returns

* :class:`HFClassifier`: the model in eval mode under the name ``model`` (its layers are named as in the
  transformers code: ``model.vit.layers.10.layernorm_before``), whose forward takes camkit's normalised batch
  ``Tensor[B, 3, H, W]`` as ``pixel_values`` and returns the **logits** ``Tensor[B, classes]``;
* the :class:`~camkit.adapters.Preprocess` of the model's own image processor (``AutoImageProcessor`` saved in the
  same folder): the crop size when it crops (camkit resizes the whole image to that size, so the map covers all the
  image), else its ``size``; its ``image_mean`` / ``image_std`` (0 and 1 when it does not normalise). A folder
  without a processor: the config's ``image_size`` and ImageNet's mean and std;
* the class names of ``config.id2label``.

The model's attention implementation (``sdpa`` or ``eager``) is kept as it was saved; the attention methods read
the probabilities without changing it (:mod:`camkit.methods.attention`).

Importing this module does not import transformers; :func:`load` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from camkit.adapters.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from camkit.errors import CamkitError

__all__ = ["HFClassifier", "hf_prefix_tokens", "labels_of", "load", "preprocess_of"]


def hf_prefix_tokens(model: nn.Module) -> int | None:
    """The prefix tokens of a transformers ViT-family model (class, distillation and register tokens of its
    ``embeddings``), or None when it has no such ``embeddings``."""
    base = getattr(model, "base_model", None)
    embeddings = getattr(base if isinstance(base, nn.Module) else model, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        return None
    count = 0
    found = False
    for attr in ("cls_token", "distillation_token"):
        if isinstance(getattr(embeddings, attr, None), Tensor):
            found = True
            count += 1
    registers = getattr(embeddings, "register_tokens", None)
    if isinstance(registers, Tensor):
        found = True
        count += int(registers.shape[-2]) if registers.dim() >= 2 else 1
    return count if found else None


class HFClassifier(nn.Module):
    """A transformers image classifier seen as ``pixel_values -> logits``.

    The transformers model is the submodule ``model`` (the very object: nothing of it is copied or changed), so
    the layer names are the transformers ones under ``model.`` (the hand-written recipe's
    ``model.vit.encoder.layer[-2].output`` of older transformers is ``model.vit.layers.10`` in transformers 5).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_prefix_tokens = hf_prefix_tokens(model)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(pixel_values=x).logits
        assert isinstance(logits, Tensor)
        return logits


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return (int(value["shortest_edge"]), int(value["shortest_edge"]))
    if value is not None and hasattr(value, "height") and hasattr(value, "width"):  # transformers SizeDict
        h, w = getattr(value, "height", None), getattr(value, "width", None)
        if isinstance(h, int) and isinstance(w, int):
            return (h, w)
        edge = getattr(value, "shortest_edge", None)
        if isinstance(edge, int):
            return (edge, edge)
    return None


def _triple(value: object, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return default


def preprocess_of(processor: Any, config: Any) -> Preprocess:
    """camkit's :class:`~camkit.adapters.Preprocess` from a transformers image processor (None: from the config's
    ``image_size``, ImageNet mean/std)."""
    size = _pair(getattr(config, "image_size", None)) or (224, 224)
    if processor is None:
        return Preprocess(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    crop = (
        _pair(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    )
    size = crop or _pair(getattr(processor, "size", None)) or size
    if not getattr(processor, "do_normalize", True):
        return Preprocess(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    mean = _triple(getattr(processor, "image_mean", None), IMAGENET_MEAN)
    std = _triple(getattr(processor, "image_std", None), IMAGENET_STD)
    return Preprocess(size=size, mean=mean, std=std)


def labels_of(config: Any) -> list[str] | None:
    """The class names of ``config.id2label`` in class order, or None when it does not name every class."""
    id2label = getattr(config, "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        return None
    table = {int(k): str(v) for k, v in id2label.items()}
    if sorted(table) != list(range(len(table))):
        return None
    return [table[i] for i in range(len(table))]


def _read(source: str, local: bool, pretrained: bool) -> tuple[nn.Module, Any]:
    """The transformers model (random weights from its config when not ``pretrained``) and its image processor
    (None when there is none)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        if pretrained:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                source, local_files_only=local
            )
        else:
            model = transformers.AutoModelForImageClassification.from_config(config)
    except ValueError as err:
        raise CamkitError(
            f"hf:{source} is not an image classifier transformers can load with "
            f"AutoModelForImageClassification ({err}); camkit reads transformers image classifiers only"
        ) from err
    except OSError as err:
        if local:
            raise CamkitError(
                f"hf:{source}: not a save_pretrained folder of a transformers model ({err})"
            ) from err
        raise CamkitError(
            f"hf:{source}: could not get this hub model ({type(err).__name__}); a network is needed to download "
            "it: without one, pass a local folder written by save_pretrained (hf:PATH)"
        ) from err
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, KeyError):
        processor = None
    return model, processor


def load(
    source: str, pretrained: bool = True, device: str | Any = "cpu"
) -> tuple[HFClassifier, Preprocess, list[str] | None]:
    """A transformers image classifier from a ``save_pretrained`` folder or a hub id.

    Args:
        source: a local folder (read offline) or a hub id such as ``google/vit-base-patch16-224`` (needs a network
            unless it is in the Hugging Face cache).
        pretrained: False: random weights from the model's config.
        device: where to put the model.

    Returns:
        (the model's :class:`HFClassifier` view in eval mode, its Preprocess, its class names or None).
    """
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise CamkitError("hf: models need the transformers library: pip install 'camkit[hf]'") from err
    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and (source.startswith((".", "/", "~")) or path.exists()):
        raise CamkitError(f"hf:{source}: no such folder; give a save_pretrained folder or a hub id")
    model, processor = _read(str(path) if local else source, local, pretrained)
    model = model.eval().to(device)
    return HFClassifier(model).eval(), preprocess_of(processor, model.config), labels_of(model.config)
