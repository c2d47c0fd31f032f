"""The real pretrained default (EfficientNet-Lite0, offline ImageNet weights) on real photos."""

from __future__ import annotations

import pytest
import torch

import camkit
from camkit.core.postprocess import upsample

pytestmark = pytest.mark.slow


def _peak_in_original(expl, index, size_wh):
    w, h = size_wh
    m = upsample(expl.maps[index], (h, w))
    flat = int(m.argmax())
    return flat % w, flat // w  # x, y in original pixels


def test_default_model_classifies_the_samples(pretrained):
    imgs = [camkit.sample_image("chelsea"), camkit.sample_image("coffee")]
    e = camkit.explain(pretrained.model, imgs, preprocess=pretrained.preprocess)
    assert e.classes.tolist() == [285, 967]
    assert e.labels == ["Egyptian cat", "espresso"]
    assert e.probs[0] > 0.6
    assert e.layers == ["bn2"]


@pytest.mark.parametrize(
    "method", ["gradcam", "gradcam++", "layercam", "xgradcam", "hirescam", "cam", "eigencam", "eigengradcam"]
)
def test_peak_lies_on_the_object(pretrained, method):
    cat, coffee = camkit.sample_image("chelsea"), camkit.sample_image("coffee")
    e = camkit.explain(pretrained.model, [cat, coffee], method=method, preprocess=pretrained.preprocess)
    x, y = _peak_in_original(e, 0, cat.size)
    assert 100 <= x <= 360 and 40 <= y <= 300, f"cat peak at {(x, y)}"  # the cat's face, not the background
    x, y = _peak_in_original(e, 1, coffee.size)
    assert 170 <= x <= 420 and 15 <= y <= 300, f"espresso peak at {(x, y)}"  # the cup


def test_class_choice_moves_the_map(pretrained):
    """Explaining 'espresso' on the cat photo must not give the cat map (the target really matters)."""
    cat = camkit.sample_image("chelsea")
    own = camkit.explain(pretrained.model, cat, preprocess=pretrained.preprocess)
    other = camkit.explain(pretrained.model, cat, preprocess=pretrained.preprocess, targets="espresso")
    corr = torch.corrcoef(torch.stack([own.maps.flatten(), other.maps.flatten()]))[0, 1]
    assert corr < 0.9


def test_model_unchanged_pretrained(pretrained):
    from testbed import assert_unchanged, snapshot

    before = snapshot(pretrained.model)
    camkit.compare(
        pretrained.model,
        camkit.sample_image(),
        preprocess=pretrained.preprocess,
        layers="blocks.5,bn2",
        methods=["gradcam", "layercam"],
    )
    assert_unchanged(before, pretrained.model)
