"""Target layers (names, modules, auto) and targets (index, name, top-k, callables)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import camkit
from camkit.core.targets import TopK, parse_target


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", "layer4"),
        ("vgg11", "features.19"),  # not avgpool (7x7 AdaptiveAvgPool) nor `features` (ends in a MaxPool)
        ("alexnet", "features.11"),
        ("mobilenet_v3_small", "features"),
    ],
)
def test_auto_layer_torchvision(name, expected):
    model = torchvision.models.get_model(name, weights=None).eval()
    assert camkit.auto_layer(model, torch.zeros(1, 3, 96, 96)) == expected


def test_auto_layer_timm_lite0():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert camkit.auto_layer(model, torch.zeros(1, 3, 96, 96)) == "bn2"


def test_auto_on_tiny(tiny, x_small):
    e = camkit.explain(tiny, x_small)
    assert e.layers == ["features"]  # the container whose output global pooling reads


def test_unknown_layer_lists_close_matches(tiny, x_small):
    with pytest.raises(ValueError, match=r"features\.3"):
        camkit.explain(tiny, x_small, layers="feature.3")


def test_layer_by_module_and_list(tiny, x_small):
    by_name = camkit.explain(tiny, x_small, layers="features.3")
    by_module = camkit.explain(tiny, x_small, layers=tiny.features[3])
    torch.testing.assert_close(by_name.maps, by_module.maps)
    both = camkit.explain(tiny, x_small, layers=[tiny.features[1], "features.3"])
    assert both.layers == ["features.1", "features.3"]


def test_foreign_module_is_refused(tiny, x_small):
    with pytest.raises(ValueError, match="not part of the model"):
        camkit.explain(tiny, x_small, layers=nn.Conv2d(3, 3, 1))


def test_non_spatial_layer_is_refused(tiny, x_small):
    with pytest.raises(ValueError, match=r"Tensor\[B, K, h, w\]"):
        camkit.explain(tiny, x_small, layers="fc")


def test_describe_layers_shapes(tiny, x_small):
    infos = {i.name: i for i in camkit.describe_layers(tiny, x_small)}
    assert infos["features.2"].shape == (6, 8, 8)
    assert infos["pool"].passthrough and not infos["features.3"].passthrough


def test_targets_index_list_and_range(tiny, x_small):
    e = camkit.explain(tiny, x_small, targets=2)
    assert e.classes.tolist() == [2, 2, 2, 2]
    e = camkit.explain(tiny, x_small, targets=[0, 1, 2, 3])
    assert e.classes.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        camkit.explain(tiny, x_small, targets=5)
    with pytest.raises(ValueError, match="one per image"):
        camkit.explain(tiny, x_small, targets=[0, 1])


def test_top1_is_default_and_scores_are_logits(tiny, x_small):
    e = camkit.explain(tiny, x_small)
    with torch.no_grad():
        out = tiny(x_small)
    assert e.classes.tolist() == out.argmax(1).tolist()
    torch.testing.assert_close(e.scores, out.max(1).values)
    torch.testing.assert_close(e.probs, out.softmax(1).max(1).values)


def test_topk_equals_single_targets(tiny, x_small):
    e = camkit.explain(tiny, x_small, method="gradcam++", targets=TopK(3), layers="features.3")
    assert e.maps.shape == (4, 3, 16, 16) and e.classes.shape == (4, 3)
    for t in range(3):
        single = camkit.explain(
            tiny, x_small, method="gradcam++", targets=e.classes[:, t].tolist(), layers="features.3"
        )
        torch.testing.assert_close(e.maps[:, t], single.maps)


def test_callable_target_matches_class_target(tiny, x_small):
    by_fn = camkit.explain(tiny, x_small, targets=lambda out: out[:, 1], layers="features.3")
    by_cls = camkit.explain(tiny, x_small, targets=1, layers="features.3")
    torch.testing.assert_close(by_fn.maps, by_cls.maps)
    assert by_fn.classes is None
    with pytest.raises(ValueError, match="Tensor"):
        camkit.explain(tiny, x_small, targets=lambda out: out)


def test_class_names():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    assert camkit.explain(model, x, targets="tabby cat").classes.tolist() == [281]
    assert camkit.explain(model, x, targets="Egyptian cat").labels == ["Egyptian cat"]
    with pytest.raises(ValueError, match="tabby"):
        camkit.explain(model, x, targets="taby cat")


def test_parse_target():
    assert parse_target(None) is None
    assert parse_target("285") == 285
    assert parse_target("top3") == TopK(3)
    assert parse_target("tabby cat") == "tabby cat"


def test_tuple_and_dict_outputs(tiny, x_small):
    class Wrap(nn.Module):
        def __init__(self, inner, kind):
            super().__init__()
            self.inner, self.kind = inner, kind

        def forward(self, x):
            y = self.inner(x)
            return (y, y * 0) if self.kind == "tuple" else {"aux": y * 0, "logits": y}

    ref = camkit.explain(tiny, x_small, layers="features.3").maps
    for kind in ("tuple", "dict"):
        got = camkit.explain(Wrap(tiny, kind).eval(), x_small, layers="inner.features.3").maps
        torch.testing.assert_close(got, ref)
