"""Keras 3 models on the torch backend: explained by layer name, the classic Keras Grad-CAM recipe reproduced,
Keras Applications VGG16 / ResNet50 / MobileNetV2 with random weights, the CLI, and the model left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported (by the fixture)

import camkit
from camkit.adapters.keras import KerasModel, as_torch, is_keras_model
from camkit.cli import app

SIZE = 64


@pytest.fixture(scope="module")
def keras() -> Any:
    import keras as k

    if k.backend.backend() != "torch":
        pytest.fail(
            f"keras was imported with the {k.backend.backend()!r} backend; run with KERAS_BACKEND=torch"
        )
    return k


@pytest.fixture(scope="module")
def vgg(keras: Any) -> Any:
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(weights=None, input_shape=(SIZE, SIZE, 3))


def _state(model: Any) -> list[object]:
    """Everything camkit must leave as it was: layer objects, trainable flags, torch training flags, hooks,
    requires_grad and gradients of the variables."""
    layers = []
    stack = list(model.layers)
    while stack:
        layer = stack.pop(0)
        layers.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return [
        [(id(layer), layer.name, layer.trainable, layer.training) for layer in layers],
        [(len(layer._forward_hooks), len(layer._forward_pre_hooks)) for layer in layers],
        (len(model._forward_hooks), len(model._forward_pre_hooks), model.training),
        [(p.requires_grad, p.grad is None) for p in model.parameters()],
        [v.trainable for v in model.weights],
    ]


def _array(photo: Image.Image, size: int) -> np.ndarray:
    return np.asarray(photo.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)[None]


def test_classic_keras_gradcam_recipe(keras: Any, vgg: Any) -> None:
    """camkit's Grad-CAM on block5_conv3 = the Keras tutorial's recipe: a model giving (block5_conv3, logits),
    the gradient of the top logit, channel weights = its mean over the map, heatmap = A @ weights, ReLU."""
    photo = camkit.sample_image("chelsea")
    before = _state(vgg)
    expl = camkit.explain(vgg, photo, layers="block5_conv3")
    assert _state(vgg) == before

    logits_model = keras.applications.VGG16(
        weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None
    )
    logits_model.set_weights(vgg.get_weights())
    grad_model = keras.Model(
        logits_model.inputs, [logits_model.get_layer("block5_conv3").output, logits_model.output]
    )
    x = np.ascontiguousarray(keras.applications.vgg16.preprocess_input(_array(photo, SIZE)))
    with torch.enable_grad():
        conv, preds = grad_model(torch.as_tensor(x))
        top = int(preds[0].argmax())
        (grads,) = torch.autograd.grad(preds[0, top], conv)
    pooled = grads.mean(dim=(0, 1, 2))
    heatmap = (conv[0].detach() @ pooled).relu()
    assert int(expl.classes[0]) == top
    assert float(expl.scores[0]) == pytest.approx(
        float(preds[0, top].detach()), rel=1e-4
    )  # the logit, not the softmax
    ours = expl.raw["block5_conv3"][0].relu()
    torch.testing.assert_close(ours / ours.max(), heatmap / heatmap.max(), rtol=1e-4, atol=1e-4)
    assert expl.maps.shape == (1, SIZE, SIZE)
    assert expl.overlay(0, cmap="jet").size == photo.size


@pytest.mark.parametrize(
    ("build", "size", "module", "layer"),
    [
        ("ResNet50", SIZE, "resnet50", "conv5_block3_out"),
        ("MobileNetV2", 96, "mobilenet_v2", "out_relu"),
    ],
)
def test_keras_applications(keras: Any, build: str, size: int, module: str, layer: str) -> None:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, build)(weights=None, input_shape=(size, size, 3))
    before = _state(model)
    photo = camkit.sample_image("coffee")
    many = camkit.compare(model, photo, methods=["gradcam", "gradcam++", "layercam"], targets=camkit.TopK(2))
    for expl in many.values():
        assert expl.layers == [layer]  # the automatic layer: the last map, channels-last
        assert expl.maps.shape == (1, 2, size, size) and torch.isfinite(expl.maps).all()
        assert expl.raw[layer].shape == (1, 2, size // 32, size // 32)
    assert _state(model) == before
    # camkit's preprocessing is the family's preprocess_input (mobilenet: [-1, 1]; resnet: BGR, caffe means)
    view = as_torch(model)
    x = camkit.adapters.Preprocess.for_model(view)(photo)
    nhwc = (x.flip(1) if view.bgr else x).permute(0, 2, 3, 1).numpy()
    want = getattr(keras.applications, module).preprocess_input(_array(photo, size))
    np.testing.assert_allclose(nhwc, want, rtol=1e-4, atol=1e-3)


def test_layers_by_keras_name(keras: Any, vgg: Any) -> None:
    x = torch.randn(1, 3, SIZE, SIZE)
    infos = {i.name: i for i in camkit.describe_layers(vgg, x)}
    assert infos["block5_conv3"].spatial == (512, SIZE // 16, SIZE // 16)
    assert infos["block5_conv3"].layout is not None and infos["block5_conv3"].layout.kind == "nhwc"
    assert camkit.auto_layer(vgg, x) == "block5_conv3"
    with pytest.raises(ValueError, match="block5_conv3"):
        camkit.explain(vgg, x, layers="block5_conv4")  # the closest names are suggested
    assert isinstance(as_torch(vgg), KerasModel) and as_torch(vgg) is as_torch(vgg)
    assert is_keras_model(vgg) and not is_keras_model(torch.nn.Linear(1, 1))


def test_cli_keras_model(keras: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "explain",
        "--model",
        "keras:vgg16",
        "--no-pretrained",
        "--input-size",
        str(SIZE),
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "chelsea_keras-vgg16_gradcam.png").is_file()
    res = CliRunner().invoke(app, ["explain", "--model", "keras:vgg17", "--out", str(out)])
    assert res.exit_code == 2 and "keras:vgg16" in res.output


def test_offline_weights_message(keras: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from keras.src.applications import vgg16

    def offline(*args: object, **kwargs: object) -> str:
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(vgg16.file_utils, "get_file", offline)
    with pytest.raises(RuntimeError, match="could not get the ImageNet weights of keras:vgg16") as info:
        camkit.load_model("keras:vgg16", input_size=SIZE)
    assert "--no-pretrained" in str(info.value) and "--weights" in str(info.value)


def test_camkit_does_not_import_keras() -> None:
    code = (
        "import sys, torch, camkit\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),"
        " torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()\n"
        "camkit.explain(m, torch.randn(1, 3, 16, 16), layers='0')\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(camkit.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def test_channels_last_tensor_is_refused_with_the_fix(vgg: Any) -> None:
    with pytest.raises(ValueError, match=r"permute\(0, 3, 1, 2\)"):
        camkit.explain(vgg, torch.randn(1, SIZE, SIZE, 3), layers="block5_conv3")


def test_nested_keras_model(keras: Any) -> None:
    """Transfer learning: a Keras Applications base inside a Sequential; its layers are named through the base
    (dots in Keras names become underscores), the logits are read before the final softmax Dense."""
    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            base,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    before = _state(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    expl = camkit.explain(model, x)
    assert expl.layers == ["mobilenetv2_1_00_64.out_relu"] and expl.maps.shape == (2, SIZE, SIZE)
    with torch.no_grad():
        probs = model(x.permute(0, 2, 3, 1))
    torch.testing.assert_close(torch.softmax(as_torch(model)(x), 1), probs, rtol=1e-4, atol=1e-6)
    assert _state(model) == before
