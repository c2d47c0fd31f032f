"""How to build a model: :class:`ModelSpec`, one frozen record of the model options (name, weights, pretrained,
seed, threads, device), the same for every command, ``camkit run``'s processes and Ray actors, and the app.

:meth:`ModelSpec.load` is the one loader (threads and seed applied, then :func:`camkit.load_model`);
:meth:`ModelSpec.identity` is what a ``camkit run`` store records of the model (``run.json``), and
:meth:`ModelSpec.to_dict` what the commands' summary files record. The module imports no torch, so the
``camkit`` command can name the record before its heavy imports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camkit.errors import CamkitError

if TYPE_CHECKING:
    from camkit.adapters.zoo import LoadedModel

__all__ = ["DEFAULT_MODEL", "MAX_THREADS", "ModelSpec"]

#: The model of every command when none is named: EfficientNet-Lite0 with offline ImageNet weights.
DEFAULT_MODEL = "efficientnet_lite0"

#: The most CPU threads ``--threads`` may ask for.
MAX_THREADS = 4096


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: the model options of every command (``--model`` ... ``--device``), the same in
    every process that builds it.

    Attributes:
        name: :func:`camkit.load_model`'s name.
        weights: a local state_dict file, or None (a :class:`~pathlib.Path` is kept as its text, ``str(path)``).
        pretrained: the library's pretrained weights when no file is given; False: random weights drawn from
            ``seed``.
        seed: ``torch.manual_seed`` before the model is built, so that random weights are the same run after run
            (None: torch's random state is left as it is).
        threads: ``torch.set_num_threads`` before building (None: torch's choice).
        device: where the model runs (``cuda`` under torchrun: ``cuda:<LOCAL_RANK>``, see
            :mod:`camkit.run.distributed`).
        input_size: :func:`camkit.load_model`'s ``input_size`` (segmentation, detection, video, Keras and YOLO
            models), or None.
        prompts: the text prompts of a CLIP model (``clip:``, or ``hf:`` on a CLIP / SigLIP folder), one per
            zero-shot class; empty for other models.
    """

    name: str = DEFAULT_MODEL
    weights: str | Path | None = None
    pretrained: bool = True
    seed: int | None = 0
    threads: int | None = None
    device: str = "cpu"
    input_size: int | None = None
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.weights, Path):
            object.__setattr__(self, "weights", str(self.weights))
        object.__setattr__(self, "prompts", tuple(self.prompts))

    def load(self) -> LoadedModel:
        """Apply ``threads`` and ``seed``, then build the model with :func:`camkit.load_model` (looked up when
        called, so that a replacement of ``camkit.load_model`` serves every command).

        Raises:
            ValueError: ``threads`` outside 1 .. :data:`MAX_THREADS`, a ``seed`` that torch does not take, or what
                :func:`load_model` raises.
        """
        import torch

        import camkit

        if self.threads is not None:
            if not 1 <= self.threads <= MAX_THREADS:
                raise CamkitError(
                    f"--threads must be at least 1 and at most {MAX_THREADS}, got {self.threads}"
                )
            torch.set_num_threads(self.threads)
        if self.seed is not None:
            if not -(2**63) <= self.seed < 2**64:
                raise CamkitError(
                    f"--seed must lie within -2**63 .. 2**64 - 1 (torch's seeds), got {self.seed}"
                )
            torch.manual_seed(self.seed)
        extra = {"prompts": list(self.prompts)} if self.prompts else {}
        loaded: LoadedModel = camkit.load_model(
            self.name,
            weights=self.weights,
            pretrained=self.pretrained,
            device=self.device,
            input_size=self.input_size,
            **extra,
        )
        return loaded

    def identity(self) -> dict[str, Any]:
        """What decides the weights, as a ``camkit run`` store records it (device and threads do not): a weights
        file by its content (``"sha256:<hex>"``), so that other weights under the same path are another setting.
        ``input_size`` appears only when set."""
        out: dict[str, Any] = {
            "model": self.name,
            "weights": self.weights_digest(),
            "pretrained": self.pretrained,
            "seed": self.seed,
        }
        if self.input_size is not None:
            out["input_size"] = self.input_size
        if self.prompts:
            out["prompts"] = list(self.prompts)
        return out

    def weights_digest(self) -> str | None:
        """``"sha256:<hex digest>"`` of the weights file, or None without one.

        Raises:
            ValueError: the file cannot be read.
        """
        if self.weights is None:
            return None
        h = hashlib.sha256()
        try:
            with open(self.weights, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError as err:
            raise CamkitError(
                f"cannot read the weights file {self.weights!r}: {err.strerror or err}"
            ) from err
        return f"sha256:{h.hexdigest()}"

    def to_dict(self) -> dict[str, object]:
        """The model fields of the commands' summary files (``weights`` as given, or None; ``pretrained`` False
        when a weights file is given)."""
        return {
            "model": self.name,
            "weights": None if self.weights is None else str(self.weights),
            "pretrained": self.pretrained if self.weights is None else False,
            "seed": self.seed,
            "threads": self.threads,
            "device": self.device,
            **({"prompts": list(self.prompts)} if self.prompts else {}),
        }

    def file_tag(self, default: str = DEFAULT_MODEL) -> str:
        """``""`` for the default model, else ``_<name>`` (safe in a file name, at most 40 characters) to put in
        output file names."""
        name = self.name.strip()
        if name == default:
            return ""
        safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in name).strip("-.")
        return f"_{safe[:40]}" if safe else ""
