"""Method specs as an attacker writes them: integers too large for torch, values nested too deeply, scale
factors that overflow the input's size. Each is one CamkitError naming what was wrong, before or as the method
runs, never an OverflowError, a RecursionError or a traceback from torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camkit
from camkit.core.spec import parse_spec
from camkit.errors import CamkitError
from camkit.methods import get_method

HUGE = "99999999999999999999"  # over 2**64


@pytest.mark.parametrize(
    "spec",
    [f"sscam(seed={HUGE})", f"smoothgradcam++(seed={HUGE})", f"groupcam(groups={HUGE})",
     f"sscam(samples=-{HUGE})", f"cameras(scales=(1,{HUGE}))"],
)  # fmt: skip
def test_an_integer_beyond_64_bits_is_refused_by_the_parser(spec: str) -> None:
    with pytest.raises(CamkitError, match="out of range"):
        parse_spec(spec)
    with pytest.raises(CamkitError, match="out of range"):
        get_method(spec)


def test_integers_within_64_bits_are_kept() -> None:
    assert parse_spec(f"sscam(seed={2**63 - 1})") == ("sscam", {"seed": 2**63 - 1})
    assert parse_spec(f"sscam(seed={-(2**63)})") == ("sscam", {"seed": -(2**63)})


@pytest.mark.parametrize(
    "value", ["[" * 3000 + "]" * 3000, "(" * 3000 + "1" + ")" * 3000, "(a," * 3000 + ")" * 3000]
)
def test_a_value_nested_too_deeply_is_one_error(value: str) -> None:
    with pytest.raises(CamkitError, match="nested"):
        parse_spec(f"finercam(alpha={value})")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 7), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("method", ["cameras", "multiscalecam"])
@pytest.mark.parametrize("factor", ["1e308", "1e6", "inf"])
def test_a_scale_that_overflows_the_input_is_refused(method: str, factor: str) -> None:
    with pytest.raises(CamkitError, match=r"scale|factor"):
        camkit.explain(_net(), torch.rand(1, 3, 16, 16), f"{method}(scales=(1,{factor}))", layers="2")


@pytest.mark.parametrize("method", ["cameras", "multiscalecam"])
def test_a_scale_the_model_cannot_take_is_one_error(method: str) -> None:
    """A 16 px input shrunk by 1e-3 is 1 x 1: the 7 x 7 convolution refuses it."""
    with pytest.raises(CamkitError, match="does not take that size"):
        camkit.explain(_net(), torch.rand(1, 3, 16, 16), f"{method}(scales=(1,1e-3))", layers="2")


def test_multiscalecam_refuses_booleans_as_factors() -> None:
    with pytest.raises(CamkitError, match="factors"):
        get_method("multiscalecam(scales=(True,))")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("finercam(alpha=1e400)", "alpha must be a finite number"),
     ("finercam(alpha=-1e400)", "alpha must be a finite number"),
     ("smoothgradcam++(sigma=1e400)", "sigma must be a finite number >= 0"),
     ("sscam(noise_std=1e400)", "noise_std must be a finite number >= 0"),
     ("sscam(noise_std=-1.0)", "noise_std must be a finite number >= 0")],
)  # fmt: skip
def test_a_non_finite_or_negative_spread_is_refused(spec: str, needle: str) -> None:
    with pytest.raises(CamkitError, match=needle):
        get_method(spec)


def test_cameras_on_a_fixed_size_model_is_one_error() -> None:
    """A model that checks its input size (as Hugging Face ViTs do) refuses the enlarged copies."""

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-2:] != (16, 16):
                raise ValueError(
                    f"Input image size ({x.shape[-2]}*{x.shape[-1]}) doesn't match model (16*16)."
                )
            return self.net(x)

    with pytest.raises(CamkitError, match=r"does not take that size .*scales=\(1,\)"):
        camkit.explain(Fixed().eval(), torch.rand(1, 3, 16, 16), "cameras(scales=(1,2))", layers="net.2")


@pytest.mark.parametrize("spec", ["finercam(alpha=1,,n_similar=2)", "finercam(,alpha=1)", "sscam(,)"])
def test_an_empty_setting_between_commas_is_refused(spec: str) -> None:
    with pytest.raises(CamkitError, match="empty setting between commas"):
        parse_spec(spec)
    with pytest.raises(CamkitError, match="empty setting between commas"):
        get_method(spec)


def test_a_trailing_comma_is_allowed_as_in_python() -> None:
    assert parse_spec("finercam(alpha=0.5,)") == ("finercam", {"alpha": 0.5})
    assert parse_spec("finercam(alpha=0.5, n_similar=2 , )") == ("finercam", {"alpha": 0.5, "n_similar": 2})
