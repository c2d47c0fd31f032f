"""Hugging Face transformers image classifiers (``hf:PATH_OR_ID``): tiny random-weight models saved with
``save_pretrained`` into a temporary folder, loaded offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import camkit
from camkit.adapters import load_model
from camkit.errors import CamkitError
from camkit.methods.attention import attention_probabilities
from testbed import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")

ID2LABEL = {0: "cat", 1: "dog", 2: "bird"}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
FAMILIES = ("vit", "deit", "swin", "convnext", "resnet", "dinov2")


def _config(name: str) -> Any:
    t = transformers
    vit = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return {
        "vit": lambda: t.ViTConfig(**vit),
        "deit": lambda: t.DeiTConfig(**vit),
        "dinov2": lambda: t.Dinov2Config(**vit),
        "swin": lambda: t.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
        ),
        "convnext": lambda: t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
        "resnet": lambda: t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        ),
    }[name]()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        config = _config(name)
        config.id2label = ID2LABEL
        config.label2id = {v: k for k, v in ID2LABEL.items()}
        if name == "deit":  # the distilled DeiT (class and distillation tokens, two heads)
            model = transformers.DeiTForImageClassificationWithTeacher(config)
        else:
            model = transformers.AutoModelForImageClassification.from_config(config)
        model.save_pretrained(root / name)
        processor = transformers.ViTImageProcessor(
            size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD)
        )
        processor.save_pretrained(root / name)
        out[name] = root / name
    return out


def _image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(48, 40, 3) * 255).astype("uint8"))


def test_preprocess_and_labels_come_from_the_folder(folders: dict[str, Path]) -> None:
    lm = load_model(f"hf:{folders['vit']}")
    assert lm.preprocess.size == (32, 32)
    assert lm.preprocess.mean == pytest.approx(MEAN) and lm.preprocess.std == pytest.approx(STD)
    assert lm.labels == ["cat", "dog", "bird"]
    assert not lm.model.training and lm.model.num_prefix_tokens == 1
    x = lm.preprocess(_image())
    out = lm.model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3)
    e = camkit.explain(lm.model, _image(), "gradcam", preprocess=lm.preprocess, labels=lm.labels, targets=1)
    assert e.labels is not None and "dog" in str(e.labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcam_auto_layer_on_each_family(folders: dict[str, Path], family: str) -> None:
    lm = load_model(f"hf:{folders[family]}")
    before = snapshot(lm.model)
    attn = lm.model.model.config._attn_implementation
    e = camkit.explain(lm.model, _image(), "gradcam", layers="auto", preprocess=lm.preprocess)
    assert e.maps.shape == (1, 32, 32) and torch.isfinite(e.maps).all() and e.maps.max() > 0
    assert_unchanged(before, lm.model)
    assert lm.model.model.config._attn_implementation == attn


def test_hub_id_without_network_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when it was imported
    with pytest.raises(CamkitError, match="network"):
        load_model("hf:camkit-test/no-such-model")
    with pytest.raises(CamkitError, match="no such folder"):
        load_model("hf:./no/such/folder")


def test_cli_explain_writes_an_overlay_offline(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from camkit.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    img = tmp_path / "photo.png"
    _image().save(img)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(img), "--model", f"hf:{folders['vit']}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    pngs = list(out.glob("*.png"))
    assert pngs and Image.open(pngs[0]).size == (40, 48)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_probabilities_are_the_models_own(folders: dict[str, Path], implementation: str) -> None:
    # The probabilities camkit reads equal what the model reports with output_attentions under eager attention,
    # whichever implementation the model runs; that implementation is left as it was.
    model = transformers.AutoModelForImageClassification.from_pretrained(
        folders["vit"], attn_implementation=implementation
    ).eval()
    eager = transformers.AutoModelForImageClassification.from_pretrained(
        folders["vit"], attn_implementation="eager"
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = eager(pixel_values=x, output_attentions=True).attentions
    before = snapshot(model)
    _, probs, _ = attention_probabilities(model, x, lambda o: o.logits)
    assert len(probs) == 2
    for p, q in zip(probs, expected, strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == implementation
    assert_unchanged(before, model)


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
@pytest.mark.parametrize("method", ["rollout", "gradrollout", "legrad"])
def test_attention_methods_on_transformers_vits(folders: dict[str, Path], family: str, method: str) -> None:
    lm = load_model(f"hf:{folders[family]}")
    before = snapshot(lm.model)
    if family == "dinov2" and method == "legrad":  # its head reads [class token, mean patch]: refused clearly
        with pytest.raises(CamkitError, match="LeGrad needs"):
            camkit.explain(lm.model, _image(), method, preprocess=lm.preprocess, targets=0)
        return
    e = camkit.explain(lm.model, _image(), method, preprocess=lm.preprocess, targets=0)
    assert e.maps.shape == (1, 32, 32) and torch.isfinite(e.maps).all() and e.maps.max() > 0
    assert_unchanged(before, lm.model)


def test_attention_methods_refuse_swin_and_cnns(folders: dict[str, Path]) -> None:
    for family, message in (("swin", "windowed"), ("resnet", "no self-attention")):
        lm = load_model(f"hf:{folders[family]}")
        with pytest.raises(CamkitError, match=message):
            camkit.explain(lm.model, _image(), "rollout", preprocess=lm.preprocess)


def test_gradcam_agrees_with_the_pytorch_grad_cam_vit_recipe(folders: dict[str, Path]) -> None:
    # The pytorch-grad-cam Hugging Face tutorial: a wrapper returning .logits, the block output of the
    # second-to-last layer (encoder.layer[-2].output in transformers 4; the layer itself in transformers 5), and a
    # reshape dropping the class token.
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    lm = load_model(f"hf:{folders['vit']}")
    x = lm.preprocess([_image(), _image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)])

    def reshape(t: torch.Tensor) -> torch.Tensor:
        a = t[:, 1:, :].reshape(t.shape[0], 4, 4, t.shape[2])
        return a.transpose(2, 3).transpose(1, 2)

    layer = lm.model.model.vit.layers[-2]
    with GradCAM(lm.model, [layer], reshape_transform=reshape) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    ours = camkit.explain(lm.model, x, "gradcam", layers="model.vit.layers.0", targets=[1, 2])
    a = ours.maps.double().flatten(1)
    b = torch.as_tensor(ref).double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert (r >= 0.999).all(), r


def test_attention_is_read_thread_safely(folders: dict[str, Path]) -> None:
    # One model shared by threads: each thread's maps equal the maps computed alone (the mode is per-thread).
    from concurrent.futures import ThreadPoolExecutor

    lm = load_model(f"hf:{folders['vit']}")
    images = [_image(), _image().rotate(90, expand=True), _image().transpose(Image.Transpose.FLIP_TOP_BOTTOM)]

    def run(i: int) -> torch.Tensor:
        method = ("gradrollout", "rollout", "legrad")[i % 3]
        return camkit.explain(lm.model, images[i % 3], method, preprocess=lm.preprocess, targets=0).maps

    alone = [run(i) for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(run, range(6)))
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b)


def test_gradcam_agrees_with_the_pytorch_grad_cam_swin_recipe(folders: dict[str, Path]) -> None:
    # The pytorch-grad-cam Hugging Face tutorial's Swin recipe: a wrapper returning .logits, the final layer norm
    # model.swin.layernorm as the layer, and a reshape of its tokens [B, h*w, C] (no class token) to [B, C, h, w].
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    lm = load_model(f"hf:{folders['swin']}")
    x = lm.preprocess([_image(), _image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)])

    def reshape(t: torch.Tensor) -> torch.Tensor:
        a = t.reshape(t.shape[0], 4, 4, t.shape[2])  # 32 px at the last stage's stride 8
        return a.transpose(2, 3).transpose(1, 2)

    with GradCAM(lm.model, [lm.model.model.swin.layernorm], reshape_transform=reshape) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    ours = camkit.explain(lm.model, x, "gradcam", layers="model.swin.layernorm", targets=[1, 2])
    a = ours.maps.double().flatten(1)
    b = torch.as_tensor(ref).double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert (r >= 0.999).all(), r
