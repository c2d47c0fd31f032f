"""Method specs as an attacker writes them: integers too large for torch, values nested too deeply, scale
factors that overflow the input's size. Each is one CamkitError naming what was wrong, before or as the method
runs, never an OverflowError, a RecursionError or a traceback from torch."""

from __future__ import annotations

import pytest

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
