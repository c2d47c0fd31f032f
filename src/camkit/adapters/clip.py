"""Zero-shot CLIP and SigLIP models: "why is this *a photo of a cat*".

:class:`ZeroShotCLIP` turns an image-text model and a list of text prompts into an image classifier: the image in,
one logit per prompt out, ``logit_scale * cos(image embedding, text embedding) + logit_bias`` (CLIP's zero-shot
logits; SigLIP's add its ``logit_bias``). The prompts are the classes (``labels``), so every method explains the
similarity of the image to one prompt (``targets="a photo of a cat"`` or its index), and several prompts are the
zero-shot classes (the top one explained by default). The text embeddings are computed once, without gradient,
when the view is built; the model is its submodule ``model`` (the very object, unchanged), its image tower the only
part that runs in the forward.

Two sources:

* open_clip models (the ``camkit[clip]`` extra): :func:`from_open_clip` (a model and its tokenizer), or ``clip:``
  names (:func:`load_open_clip`): ``clip:ARCH`` (an open_clip config name such as ``ViT-B-32``; random weights with
  ``pretrained=False``), ``clip:ARCH:CHECKPOINT`` (a local weights file), ``clip:DIR`` (a folder holding
  ``open_clip_config.json`` and optionally its weights, open_clip's ``local-dir:``);
* transformers ``CLIPModel`` / ``SiglipModel`` (the ``camkit[hf]`` extra): :func:`from_transformers`, or
  ``hf:DIR`` on a ``save_pretrained`` folder of one (:func:`load_transformers`), its tokenizer and image processor
  saved in the same folder.

``layers="auto"`` is camkit's usual choice on the image tower (the input of the last attention for ViTs).
Importing this module imports neither open_clip nor transformers.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit.adapters.preprocess import Preprocess
from camkit.errors import CamkitError

__all__ = [
    "ZeroShotCLIP",
    "from_open_clip",
    "from_transformers",
    "is_transformers_zero_shot",
    "load_open_clip",
    "load_transformers",
]

_HF_TYPES = ("clip", "siglip", "siglip2")


def _prompts(prompts: Sequence[str] | str | None) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts or [])
    items = [p.strip() for p in items if isinstance(p, str) and p.strip()]
    if not items:
        raise CamkitError(
            "a zero-shot CLIP model needs text prompts, one per class: --prompt 'a photo of a cat' (repeat "
            "--prompt for several), prompts=[...] in Python"
        )
    if len(set(items)) != len(items):
        raise CamkitError(f"the prompts repeat one another: {items}; give each prompt once")
    return items


class ZeroShotCLIP(nn.Module):
    """An image-text model with fixed prompts seen as an image classifier: ``x -> Tensor[B, P]`` logits.

    Args:
        model: the image-text model (kept as the submodule ``model``).
        encode_image: ``f(x) -> Tensor[B, E]``, the image embedding (before normalisation).
        text_features: Tensor[P, E], the prompts' embeddings (normalised here).
        prompts: the P prompts, in the order of ``text_features`` (``self.prompts``, also the labels).
        logit_scale: the factor of the cosine similarities (the model's ``logit_scale.exp()``).
        logit_bias: added to the logits (SigLIP; 0 for CLIP).
    """

    def __init__(
        self,
        model: nn.Module,
        encode_image: Callable[[Tensor], Tensor],
        text_features: Tensor,
        prompts: Sequence[str],
        logit_scale: float,
        logit_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if text_features.dim() != 2 or text_features.shape[0] != len(prompts):
            raise CamkitError(
                f"text_features must be Tensor[{len(prompts)}, E] (one row per prompt), got {tuple(text_features.shape)}"
            )
        self.training = bool(
            model.training
        )  # the view's own flag follows the model; the model is not touched
        self.model = model
        self.encode_image = encode_image
        self.prompts = list(prompts)
        self.logit_scale = float(logit_scale)
        self.logit_bias = float(logit_bias)
        self.register_buffer(
            "text_features", F.normalize(text_features.detach().float(), dim=-1), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        image = F.normalize(self.encode_image(x).float(), dim=-1)
        text = self.text_features
        assert isinstance(text, Tensor)
        return self.logit_scale * image @ text.T + self.logit_bias


def _scalar(value: object, exp: bool) -> float:
    if isinstance(value, Tensor):
        v = float(value.detach().float().reshape(-1)[0])
    elif isinstance(value, (int, float)):
        v = float(value)
    else:
        return 1.0 if exp else 0.0
    return float(torch.tensor(v).exp()) if exp else v


# ------------------------------------------------------------------------------------------------ open_clip


def from_open_clip(
    model: nn.Module, tokenizer: Callable[[list[str]], Tensor], prompts: Sequence[str] | str
) -> ZeroShotCLIP:
    """An open_clip model (``CLIP``, ``CustomTextCLIP``) and its tokenizer (``open_clip.get_tokenizer(name)``) with
    ``prompts`` as a zero-shot classifier."""
    items = _prompts(prompts)
    device = next(model.parameters()).device
    with torch.no_grad():
        text = model.encode_text(tokenizer(items).to(device))  # type: ignore[operator]
    view = ZeroShotCLIP(
        model,
        model.encode_image,  # type: ignore[arg-type]
        text,
        items,
        _scalar(getattr(model, "logit_scale", None), exp=True),
        _scalar(getattr(model, "logit_bias", None), exp=False),
    )
    return view


def _open_clip_name(source: str) -> tuple[str, str | None]:
    """``clip:`` text -> (open_clip model name, checkpoint file or None)."""
    import open_clip

    path = Path(source).expanduser()
    if path.is_dir():
        return f"local-dir:{path}", None
    arch, _, checkpoint = source.partition(":")
    names = open_clip.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise CamkitError(
            f"clip:{source}: {arch!r} is neither a folder nor an open_clip config name (open_clip.list_models()).{hint}"
        )
    return arch, (checkpoint or None)


def load_open_clip(
    source: str,
    prompts: Sequence[str] | str | None,
    pretrained: bool = True,
    weights: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[ZeroShotCLIP, Preprocess]:
    """``clip:ARCH``, ``clip:ARCH:CHECKPOINT`` or ``clip:DIR`` as a :class:`ZeroShotCLIP` with its Preprocess.

    ``ARCH`` alone needs ``pretrained=False`` (random weights): open_clip's pretrained weights are downloaded,
    which camkit does not do; ``CHECKPOINT`` (or ``weights``) is a local file.
    """
    items = _prompts(prompts)
    try:
        import open_clip
    except ImportError as err:
        raise CamkitError("clip: models need open_clip: pip install 'camkit[clip]'") from err
    name, checkpoint = _open_clip_name(source)
    checkpoint = checkpoint or weights
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise CamkitError(f"clip:{source}: the checkpoint {checkpoint!r} is not a local file")
    if checkpoint is None and pretrained and not name.startswith("local-dir:"):
        raise CamkitError(
            f"clip:{source}: open_clip's pretrained weights are downloaded, which needs a network: give a local "
            f"file (clip:{name}:CHECKPOINT or --weights), or --no-pretrained (pretrained=False) for random weights"
        )
    try:
        model = open_clip.create_model(name, pretrained=checkpoint, device=device)
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        raise CamkitError(
            f"clip:{source}: open_clip could not build it ({type(err).__name__}: {err})"
        ) from err
    model = model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    side = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    preprocess = Preprocess(size=side, mean=mean, std=std)  # type: ignore[arg-type]
    return from_open_clip(model, tokenizer, items), preprocess


# ------------------------------------------------------------------------------------------------ transformers


def _hf_image(model: nn.Module, x: Tensor) -> Tensor:
    out = model.get_image_features(pixel_values=x)  # type: ignore[operator]
    feats = out if isinstance(out, Tensor) else out.pooler_output
    assert isinstance(feats, Tensor)
    return feats


def _hf_image_features(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The image embedding of a transformers model: a partial, not a closure, so that a deep copy of the view
    (camkit's prepared copy) calls its own copy of the model."""
    return functools.partial(_hf_image, model)


def _hf_text(model: nn.Module, tokenizer: Any, prompts: list[str]) -> Tensor:
    """The prompts' text embeddings; SigLIP's are padded to the longest position, as it was trained."""
    config: Any = model.config
    siglip = "siglip" in str(getattr(config, "model_type", ""))
    if siglip:
        length = int(config.text_config.max_position_embeddings)
        tokens = tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
    else:
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    args = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    if siglip:
        args.pop("attention_mask", None)  # SigLIP reads the padded sequence whole
    with torch.no_grad():
        out = model.get_text_features(**args)  # type: ignore[operator]
    feats = out if isinstance(out, Tensor) else out.pooler_output
    assert isinstance(feats, Tensor)
    return feats


def from_transformers(model: nn.Module, tokenizer: Any, prompts: Sequence[str] | str) -> ZeroShotCLIP:
    """A transformers ``CLIPModel`` or ``SiglipModel`` and its tokenizer with ``prompts`` as a zero-shot classifier."""
    items = _prompts(prompts)
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise CamkitError(f"{type(model).__name__} is not an image-text model (CLIPModel, SiglipModel)")
    view = ZeroShotCLIP(
        model,
        _hf_image_features(model),
        _hf_text(model, tokenizer, items),
        items,
        _scalar(getattr(model, "logit_scale", None), exp=True),
        _scalar(getattr(model, "logit_bias", None), exp=False),
    )
    return view


def is_transformers_zero_shot(source: str) -> bool:
    """Whether ``source`` is a local folder holding a transformers CLIP or SigLIP model (its ``config.json``)."""
    config = Path(source).expanduser() / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in _HF_TYPES


def load_transformers(
    source: str,
    prompts: Sequence[str] | str | None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[ZeroShotCLIP, Preprocess]:
    """A ``save_pretrained`` folder of a CLIP / SigLIP model, with its tokenizer and image processor (read offline)."""
    from camkit.adapters.huggingface import preprocess_of

    items = _prompts(prompts)
    import transformers

    path = str(Path(source).expanduser())
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if pretrained:
            model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        else:
            model = transformers.AutoModel.from_config(config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CamkitError(
            f"hf:{source}: cannot read this CLIP / SigLIP folder ({type(err).__name__}); it needs the model and its "
            "tokenizer saved with save_pretrained"
        ) from err
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError):
        processor = None
    model = model.eval().to(device)
    return from_transformers(model, tokenizer, items), preprocess_of(processor, model.config.vision_config)
