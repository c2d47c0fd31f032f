"""Robustness: does the map stay when the input moves a little (Yeh et al., "On the (In)fidelity and Sensitivity
of Explanations", NeurIPS 2019)?

For maps M of a method on inputs x and the same method's maps M' of perturbed inputs x' = x + u, u uniform in
[-radius, radius] per value (Quantus 0.6.0's ``uniform_noise``, radius 0.2), the sensitivity of one draw is
``||M' - M||_F / ||M||_F`` per image. Max-Sensitivity is its maximum over the draws, Avg-Sensitivity its mean
(lower is better for both). The method runs again on every draw: the caller passes it as ``remap`` (a function of
the perturbed inputs, for the same classes), as :func:`camkit.metrics.arcc` does; ``camkit evaluate``, ``camkit
run`` and ``camkit report`` pass the method of the maps. The noise comes from a CPU generator seeded with ``seed``
(``torch.rand(samples, B, C, H, W)``, scaled to [-radius, radius)), so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.metrics._common import Forward, check_inputs

__all__ = [
    "Radius",
    "SensitivityResult",
    "avg_sensitivity",
    "max_sensitivity",
    "sensitivity",
    "uniform_noise",
]


#: The noise's range: a radius r (U(-r, r)) or bounds (low, high) (U(low, high)).
Radius = float | tuple[float, float]


def uniform_noise(shape: tuple[int, ...], samples: int, radius: Radius, seed: int = 0) -> Tensor:
    """Tensor[samples, *shape]: uniform noise in [-radius, radius), or in [low, high) for ``radius=(low, high)``,
    from ``torch.rand(samples, *shape)`` of a CPU generator seeded with ``seed``."""
    low, high = _bounds(radius)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(samples, *shape, generator=gen)
    return (u * 2 - 1) * high if isinstance(radius, (int, float)) else low + u * (high - low)


def _bounds(radius: Radius) -> tuple[float, float]:
    if isinstance(radius, tuple) and len(radius) == 2:
        low, high = float(radius[0]), float(radius[1])
        if not low < high:
            raise CamkitError(f"radius (low, high) must have low < high, got {radius!r}")
        return low, high
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius >= 0:
        raise CamkitError(f"radius must be a number >= 0 or a pair (low, high), got {radius!r}")
    return -float(radius), float(radius)


@dataclass(frozen=True)
class SensitivityResult:
    """The sensitivity of each draw.

    Attributes:
        values: Tensor[B, S], ``||M' - M||_F / ||M||_F`` of each image and draw (NaN for a draw that changed the
            model's top-1 when ``nan_when_prediction_changes``; an all-zero map M has no relative change: NaN when
            M' is zero too, inf otherwise, as Quantus).
    """

    values: Tensor

    @property
    def max(self) -> Tensor:
        """Tensor[B], Max-Sensitivity (the maximum over the draws, NaN draws left out)."""
        v = self.values
        top = torch.where(v.isnan(), torch.full_like(v, -torch.inf), v).amax(dim=1)
        return torch.where(v.isnan().all(dim=1), torch.full_like(top, torch.nan), top)

    @property
    def mean(self) -> Tensor:
        """Tensor[B], Avg-Sensitivity (the mean over the draws, NaN draws left out)."""
        return self.values.nanmean(dim=1)


def sensitivity(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    remap: Callable[[Tensor], Tensor],
    samples: int = 200,
    radius: Radius = 0.2,
    seed: int = 0,
    nan_when_prediction_changes: bool = False,
    forward: Forward | None = None,
) -> SensitivityResult:
    """The sensitivity of maps Tensor[B, H, W] to ``samples`` uniform perturbations of the inputs.

    Args:
        model: the classifier, in eval mode (its top-1 is compared only with ``nan_when_prediction_changes``).
        inputs: the normalised inputs the maps explain, Tensor[B, C, H, W].
        maps: the method's maps at the input size.
        remap: the same method's maps of perturbed inputs for the same classes -> Tensor[B, H, W], e.g.
            ``lambda x: camkit.explain(model, x, "gradcam", targets=classes).maps``.
        samples: number of draws (Quantus: 200).
        radius: half-width of the uniform noise on the normalised input (Quantus' ``lower_bound``, 0.2), or a pair
            (low, high): noise from U(low, high) (Quantus' ``lower_bound`` and ``upper_bound``).
        seed: seed of the noise.
        nan_when_prediction_changes: a draw that changes the model's top-1 counts as NaN (Quantus'
            ``return_nan_when_prediction_changes``).
        forward: how the perturbed images reach the model (for the top-1 check).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CamkitError(f"samples must be an int >= 1, got {samples!r}")
    x, m = check_inputs(model, inputs, maps)
    fwd = forward or Forward(model)
    noise = uniform_noise(tuple(x.shape), samples, radius, seed)
    top1 = fwd(x).argmax(dim=1) if nan_when_prediction_changes else None
    norm = m.flatten(1).double().norm(dim=1)
    out = torch.empty(x.shape[0], samples, dtype=torch.float64, device=x.device)
    for i in range(samples):
        xp = x + noise[i].to(x.device)
        mp = remap(xp)
        if not isinstance(mp, Tensor) or tuple(mp.shape) != tuple(m.shape):
            got = tuple(mp.shape) if isinstance(mp, Tensor) else type(mp).__name__
            raise CamkitError(
                f"remap must give maps of shape {tuple(m.shape)} for the perturbed inputs, got {got}"
            )
        out[:, i] = (mp.to(m.device).double() - m.double()).flatten(1).norm(dim=1) / norm  # 0 / 0: NaN
        if top1 is not None:
            changed = fwd(xp).argmax(dim=1) != top1
            out[changed, i] = torch.nan
    return SensitivityResult(values=out.float())


def max_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    remap: Callable[[Tensor], Tensor],
    samples: int = 200,
    radius: Radius = 0.2,
    seed: int = 0,
    forward: Forward | None = None,
) -> Tensor:
    """Max-Sensitivity (Yeh et al. 2019; lower is better), Tensor[B]: :func:`sensitivity`'s maximum."""
    return sensitivity(model, inputs, maps, remap, samples, radius, seed, forward=forward).max


def avg_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    remap: Callable[[Tensor], Tensor],
    samples: int = 200,
    radius: Radius = 0.2,
    seed: int = 0,
    forward: Forward | None = None,
) -> Tensor:
    """Avg-Sensitivity (Yeh et al. 2019; lower is better), Tensor[B]: :func:`sensitivity`'s mean."""
    return sensitivity(model, inputs, maps, remap, samples, radius, seed, forward=forward).mean
