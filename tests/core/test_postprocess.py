"""Post-processing properties: normalisation never gives NaN, upsampling keeps the range."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from camkit.core.postprocess import fuse, normalize, upsample

floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=4, max_size=36).filter(lambda v: len(v) in (4, 9, 16, 36)))
def test_normalize_in_unit_range_and_nan_free(values):
    n = int(len(values) ** 0.5)
    m = torch.tensor(values, dtype=torch.float32).reshape(1, n, n)
    out = normalize(m)
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    if out.max() > 0:  # not treated as constant: the extremes map to 0 and 1
        assert out.min() == 0 and out.max() == 1
        assert out.flatten()[int(m.argmax())] == 1 and out.flatten()[int(m.argmin())] == 0


def test_constant_and_zero_maps_become_zeros():
    for value in (0.0, 3.0, -2.0, 1e-30):
        out = normalize(torch.full((2, 5, 5), value))
        assert torch.equal(out, torch.zeros(2, 5, 5))


def test_minmax_before_or_after_upsampling_differ_by_an_affine_map():
    torch.manual_seed(0)
    raw = torch.rand(3, 7, 7)
    a = normalize(upsample(raw, (224, 224)))
    b = upsample(normalize(raw), (224, 224))
    assert not torch.allclose(a, b)  # grad-cam's order gives a slightly narrower range
    for i in range(3):
        assert a[i].min() == 0 and a[i].max() == 1
        corr = torch.corrcoef(torch.stack([a[i].flatten(), b[i].flatten()]))[0, 1]
        assert corr > 0.99999


def test_fuse_single_is_identity_and_bad_mode():
    m = torch.rand(1, 4, 4)
    assert fuse([m]) is m
    try:
        fuse([m, m], mode="median")
    except ValueError as err:
        assert "max" in str(err)
    else:
        raise AssertionError("bad fusion mode accepted")
