"""ARCC: ROAD combined with Complexity and Coherency ("How to Evaluate and Refine your CAM", arXiv 2605.14641), as
pytorch-grad-cam 1.5.7's ``pytorch_grad_cam.metrics.arcc.ARCC``.

For maps M in [0, 1] of a method on inputs x (Tensor[B, C, H, W]), per image:

* complexity = mean |M| over the pixels (the L1 norm over the pixel count; Nguyen & Martinez, arXiv 2104.10252):
  0 for an empty map, 1 for a map of ones;
* coherency = (rho(M', M) + 1) / 2, where M' is the same method's map, for the same class, of the masked input
  x * M, and rho is Pearson's correlation (sample standard deviations, 1e-8 added to their product, as
  pytorch-grad-cam): 1 when explaining what the map keeps gives the same map;
* road = ROAD combined, (mean LeRF score - mean MoRF score) / 2 over the removal fractions (0.2, 0.4, 0.6, 0.8)
  (camkit's :func:`camkit.metrics.road`, the softmax probability of the class, noisy linear imputation), then
  scaled by 2 and clipped to [0, 1];
* ARCC = 3 / (1 / (coherency + 1e-8) + 1 / (1 - complexity + 1e-8) + 1 / (road + 1e-8)), their harmonic mean (higher
  is better).

pytorch-grad-cam's ROAD subtracts the unperturbed score from each perturbed one (``return_diff``); in the
combination LeRF - MoRF that score cancels, so ROAD combined is the same. Its MoRF at percentile p removes the
pixels above the map's p-th percentile (the 1 - p most relevant), so its percentiles 20, 40, 60, 80 remove the same
fractions as camkit's (on maps without ties: it removes every pixel at or above the percentile, camkit exactly the
fraction in rank order, ties in raster order). Its imputation noise is drawn from torch's global generator;
camkit's is seeded (``seed``). pytorch-grad-cam passes one list of targets to ROAD and to the coherency's second
explanation; camkit scores ROAD by the softmax probability (ARCC clips ROAD to [0, 1], a probability scale) and
re-explains the masked input as the maps were made (the method's score, the logit by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from camkit.errors import CamkitError
from camkit.metrics._common import Forward, check_inputs
from camkit.metrics.faithfulness import road

__all__ = ["ArccResult", "arcc", "coherency", "complexity"]

#: The removal fractions of ARCC's ROAD (pytorch-grad-cam's ``road_percentiles=[20, 40, 60, 80]``).
ARCC_PERCENTAGES = (0.2, 0.4, 0.6, 0.8)


def complexity(maps: Tensor) -> Tensor:
    """Tensor[B]: the mean absolute value of each map of Tensor[B, H, W]."""
    return maps.float().abs().flatten(1).mean(dim=1)


def coherency(maps: Tensor, remapped: Tensor) -> Tensor:
    """Tensor[B]: (Pearson(remapped, maps) + 1) / 2 per image (sample standard deviations, eps 1e-8)."""
    a = remapped.double().flatten(1)
    b = maps.double().flatten(1)
    n = a.shape[1]
    ac = a - a.mean(dim=1, keepdim=True)
    bc = b - b.mean(dim=1, keepdim=True)
    cov = (ac * bc).sum(dim=1) / (n - 1)
    std_a = (ac.square().sum(dim=1) / (n - 1)).sqrt()
    std_b = (bc.square().sum(dim=1) / (n - 1)).sqrt()
    rho = cov / (std_a * std_b + 1e-8)
    return ((rho + 1) / 2).float()


@dataclass(frozen=True)
class ArccResult:
    """ARCC and its three parts, each Tensor[B].

    Attributes:
        arcc: the harmonic mean of coherency, 1 - complexity and road (higher is better).
        complexity: mean |M|.
        coherency: (Pearson(M of x * M, M) + 1) / 2.
        road: ROAD combined, scaled by 2 and clipped to [0, 1].
    """

    arcc: Tensor
    complexity: Tensor
    coherency: Tensor
    road: Tensor


def arcc(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    remap: Callable[[Tensor], Tensor],
    classes: Tensor | int | None = None,
    percentages: Sequence[float] = ARCC_PERCENTAGES,
    noise: float = 0.01,
    seed: int = 0,
    forward: Forward | None = None,
) -> ArccResult:
    """ARCC of maps Tensor[B, H, W] in [0, 1] on normalised inputs Tensor[B, C, H, W].

    Args:
        model: the classifier, in eval mode.
        inputs: the model inputs the maps explain.
        maps: the method's maps at the input size.
        remap: the same method's maps of other inputs Tensor[B, C, H, W] for the same classes -> Tensor[B, H, W]
            (coherency explains ``inputs * maps`` with it), e.g.
            ``lambda x: camkit.explain(model, x, "gradcam", targets=classes).maps``.
        classes: the explained classes (None: each image's top-1).
        percentages: ROAD's removal fractions.
        noise, seed: ROAD's imputation noise and its seed.
        forward: how the perturbed images reach the model (in chunks).
    """
    x, m = check_inputs(model, inputs, maps)
    fwd = forward or Forward(model)
    remapped = remap(x * m[:, None])
    if not isinstance(remapped, Tensor) or tuple(remapped.shape) != tuple(m.shape):
        got = tuple(remapped.shape) if isinstance(remapped, Tensor) else type(remapped).__name__
        raise CamkitError(
            f"ARCC's remap must give maps of shape {tuple(m.shape)} for the masked input, got {got}"
        )
    morf, lerf = (
        road(model, x, m, classes, percentages, order, noise=noise, seed=seed, forward=fwd).mean_score
        for order in ("morf", "lerf")
    )
    road_part = (lerf - morf).clamp(0, 1)
    comp = complexity(m)
    coh = coherency(m, remapped.to(m.device))
    total = 3 / (1 / (coh + 1e-8) + 1 / ((1 - comp) + 1e-8) + 1 / (road_part + 1e-8))
    return ArccResult(arcc=total, complexity=comp, coherency=coh, road=road_part)
