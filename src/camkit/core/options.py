"""The settings of one :func:`camkit.explain` / :func:`camkit.compare` call, as one record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from camkit.adapters import Preprocess
from camkit.core.augment import Augment, AugmentSpec, resolve_augment
from camkit.core.layers import LayerSpec
from camkit.core.outputs import OutputSpec
from camkit.core.targets import TargetSpec
from camkit.core.tokens import Reshape
from camkit.errors import CamkitError
from camkit.methods.engine import PerturbationOptions

__all__ = ["ExplainOptions"]


@dataclass(frozen=True)
class ExplainOptions:
    """Everything a call says besides the model, the images and the methods (see :func:`camkit.explain` for each
    field's meaning). Built once per call by :meth:`build`, which checks the values; the augmented passes of
    test-time augmentation use a copy with the layers and classes the first pass resolved.

    Attributes:
        layers: the layer spec.
        targets: the target spec.
        preprocess: how PIL images become the model input (None: the model's own).
        labels: class names.
        fusion: ``"max"``, ``"mean"`` or None (the method's default).
        relu: apply the final ReLU.
        output: which part of a non-tensor output holds the scores.
        reshape: the user's layout function, or None (inferred).
        perturbation: the perturbation methods' settings.
        eigen_smooth: eigen-smoothing of each layer's map.
        augment: the test-time augmentations (empty: none).
        accelerate: run the capture forward and backward on a prepared copy of the model (BatchNorm folded,
            channels-last on CPU, checked once against the model: :mod:`camkit.core.prepared`); False: on the
            model as given.
    """

    layers: LayerSpec = "auto"
    targets: TargetSpec = None
    preprocess: Preprocess | None = None
    labels: Sequence[str] | None = None
    fusion: str | None = None
    relu: bool = True
    output: OutputSpec = None
    reshape: Reshape | None = None
    perturbation: PerturbationOptions = field(default_factory=PerturbationOptions)
    eigen_smooth: bool = False
    augment: tuple[Augment, ...] = ()
    accelerate: bool = True

    @classmethod
    def build(
        cls,
        layers: LayerSpec = "auto",
        targets: TargetSpec = None,
        *,
        preprocess: Preprocess | None = None,
        labels: Sequence[str] | None = None,
        fusion: str | None = None,
        relu: bool = True,
        output: OutputSpec = None,
        reshape: Reshape | None = None,
        perturbation: PerturbationOptions | None = None,
        eigen_smooth: bool = False,
        augment: AugmentSpec = None,
        accelerate: bool = True,
    ) -> ExplainOptions:
        """The record of a call's keyword arguments, checked (``augment`` resolved to its list)."""
        if not isinstance(eigen_smooth, bool):
            raise TypeError(f"eigen_smooth must be True or False, got {eigen_smooth!r}")
        if not isinstance(accelerate, bool):
            raise TypeError(f"accelerate must be True or False, got {accelerate!r}")
        if perturbation is not None and not isinstance(perturbation, PerturbationOptions):
            raise CamkitError(
                f"perturbation must be a camkit.PerturbationOptions, got {type(perturbation).__name__}"
            )
        return cls(
            layers=layers,
            targets=targets,
            preprocess=preprocess,
            labels=labels,
            fusion=fusion,
            relu=relu,
            output=output,
            reshape=reshape,
            perturbation=perturbation or PerturbationOptions(),
            eigen_smooth=eigen_smooth,
            augment=tuple(resolve_augment(augment)),
            accelerate=accelerate,
        )
