"""Metric settings that make no sense are refused when the metric list is read (before any model is loaded), by
the metric's own check: never a silent score under a key that names a setting which was not applied."""

from __future__ import annotations

import pytest

from camkit.errors import CamkitError
from camkit.metrics.registry import resolve_metrics


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("road(noise=-1)", "noise must be a finite number >= 0"),
        ("arcc(noise=-0.5)", "noise must be a finite number >= 0"),
        ("road(noise=nan)", "noise must be a finite number >= 0"),
        ("road(noise=1e400)", "noise must be a finite number >= 0"),
        ("road(noise=True)", "noise must be a finite number >= 0"),
        ("road(percentages=(nan,))", "percentages are fractions in [0, 1]"),
        ("road(percentages=(0.5,nan))", "percentages are fractions in [0, 1]"),
        ("road(percentages=())", "percentages are fractions in [0, 1]"),
        ("arcc(percentages=(nan,))", "percentages are fractions in [0, 1]"),
        ("pointing(tolerance=-5)", "tolerance must be a finite number of pixels >= 0"),
        ("pointing(tolerance=nan)", "tolerance must be a finite number of pixels >= 0"),
        ("infidelity(perturbation=gaussian,noise_mean=1e400)", "noise_mean must be a finite number"),
    ],
)
def test_a_setting_out_of_range_is_refused(spec: str, needle: str) -> None:
    with pytest.raises(CamkitError, match="^" + spec.replace("(", r"\(").replace(")", r"\)").replace("1e400", "inf")
                       .replace("[", r"\[")) as err:  # fmt: skip
        resolve_metrics([spec], have_boxes=True)
    assert needle in str(err.value)


def test_the_limits_themselves_are_kept() -> None:
    assert resolve_metrics(["road(noise=0)", "pointing(tolerance=0)", "road(percentages=(0,1))"], True) == [
        "road(noise=0)", "pointing(tolerance=0)", "road(percentages=(0,1))",
    ]  # fmt: skip
