"""The model-family matrix: random-weight torchvision and timm models (no downloads), every shared-pass method.

For each family: every method that runs on the shared capture pass (gradient and projection CAMs; CAM where the
head is GAP + Linear; attention rollout methods on transformers) gives finite maps of the input's size in [0, 1],
Grad-CAM's signed map is not identically zero (the gradient reached the layer), the automatic layer is the one
asserted below, and the model comes back unchanged. Methods that need many forwards (Score-CAM, Ablation-CAM...)
are tested elsewhere.

The results fill ``docs/compatibility.md``: the last test renders them and checks the committed file matches.
Regenerate it with ``make compat`` (``CAMKIT_WRITE_COMPAT=1 pytest tests/adapters/test_families.py``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

import camkit
from camkit.core import tasks
from camkit.core.layers import auto_layer
from camkit.core.outputs import output_fn
from camkit.methods import METHODS, AttentionMethod, LayerMethod, method_names
from camkit.methods.attention import attention_probabilities
from testbed import assert_unchanged, snapshot

DOC = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
RESULTS: dict[str, dict[str, object]] = {}


@dataclass
class Family:
    name: str  # row label
    build: Callable[[], nn.Module]
    constructor: str  # how it is built, for the table
    auto: str  # the asserted automatic layer
    size: int = 64
    task: str = "classification"
    batch: int = 2
    kind: str = "cnn"  # cnn | vit | swin | seg | det
    extra: dict[str, object] = field(default_factory=dict)


def _tv(name: str, **kw: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kw)

    return build


def _timm(name: str, **kw: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _vit_b_16() -> nn.Module:
    import torchvision

    model = torchvision.models.vit_b_16(weights=None, image_size=64)
    # torchvision initialises the classifier to zeros: every gradient would be 0. Random weights instead.
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def _det(name: str, **kw: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import detection

        return getattr(detection, name)(weights=None, weights_backbone=None, min_size=128, max_size=128, **kw)

    return build


def _seg(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import segmentation

        return getattr(segmentation, name)(weights=None, weights_backbone=None)

    return build


def _yolo(config: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        pytest.importorskip("ultralytics")
        os.environ.setdefault(
            "YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-settings-")
        )  # written on import
        from camkit.adapters import load_model

        loaded = load_model(f"yolo:{config}", input_size=64)
        tasks.set_score_threshold(loaded.model, 0.0)  # random weights: keep every detection
        return loaded.model

    return build


def _open_clip_tiny() -> nn.Module:
    open_clip = pytest.importorskip("open_clip")
    from camkit.adapters.clip import from_open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = open_clip.model.CLIP(**cfg).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return from_open_clip(model, tokenizer, ["a photo of a cat", "a photo of a dog"])


FAMILIES = [
    Family("resnet18", _tv("resnet18"), "torchvision resnet18", "layer4"),
    Family("vgg11", _tv("vgg11"), "torchvision vgg11", "features.19"),
    Family("alexnet", _tv("alexnet"), "torchvision alexnet", "features.11"),
    Family("densenet121", _tv("densenet121"), "torchvision densenet121", "features"),
    Family("mobilenet_v3_small", _tv("mobilenet_v3_small"), "torchvision mobilenet_v3_small", "features"),
    Family("efficientnet_b0", _tv("efficientnet_b0"), "torchvision efficientnet_b0", "features"),
    Family("convnext_tiny", _tv("convnext_tiny"), "torchvision convnext_tiny", "features"),
    Family("regnet_y_400mf", _tv("regnet_y_400mf"), "torchvision regnet_y_400mf", "trunk_output"),
    Family(
        "vit_b_16",
        _vit_b_16,
        "torchvision vit_b_16(image_size=64)",
        "encoder.layers.encoder_layer_11.ln_1",
        kind="vit",
    ),
    Family("swin_t", _tv("swin_t"), "torchvision swin_t", "features.7.1.norm1", kind="swin"),
    Family("tf_efficientnet_lite0", _timm("tf_efficientnet_lite0"), "timm tf_efficientnet_lite0", "bn2"),
    Family(
        "deit_tiny",
        _timm("deit_tiny_patch16_224", img_size=64),
        "timm deit_tiny_patch16_224(img_size=64)",
        "blocks.11.norm1",
        kind="vit",
    ),
    Family(
        "deit_tiny_distilled",
        _timm("deit_tiny_distilled_patch16_224", img_size=64),
        "timm deit_tiny_distilled_patch16_224(img_size=64)",
        "blocks.11.norm1",
        kind="vit",
    ),
    Family("convnext_atto", _timm("convnext_atto"), "timm convnext_atto", "stages"),
    Family(
        "swin_tiny (timm)",
        _timm("swin_tiny_patch4_window7_224", img_size=64),
        "timm swin_tiny_patch4_window7_224(img_size=64)",
        "layers.3.blocks.1.norm1",
        kind="swin",
    ),
    Family(
        "fcn_resnet50",
        _seg("fcn_resnet50"),
        "torchvision fcn_resnet50",
        "backbone.layer4",
        task="segmentation",
        kind="seg",
    ),
    Family(
        "deeplabv3_mobilenet_v3_large",
        _seg("deeplabv3_mobilenet_v3_large"),
        "torchvision deeplabv3_mobilenet_v3_large",
        "backbone.16",
        task="segmentation",
        kind="seg",
    ),
    Family(
        "fasterrcnn_mobilenet_v3_large_fpn",
        _det("fasterrcnn_mobilenet_v3_large_fpn", box_score_thresh=0.0),
        "torchvision fasterrcnn_mobilenet_v3_large_fpn(min_size=128)",
        "backbone.body.16",
        size=128,
        batch=1,
        task="detection",
        kind="det",
    ),
    Family(
        "retinanet_resnet50_fpn",
        _det("retinanet_resnet50_fpn", score_thresh=0.0),
        "torchvision retinanet_resnet50_fpn(min_size=128)",
        "backbone.body.layer4",
        size=128,
        batch=1,
        task="detection",
        kind="det",
    ),
    Family(
        "fcos_resnet50_fpn",
        _det("fcos_resnet50_fpn", score_thresh=0.0),
        "torchvision fcos_resnet50_fpn(min_size=128)",
        "backbone.body.layer4",
        size=128,
        batch=1,
        task="detection",
        kind="det",
    ),
    Family(
        "yolov8n (ultralytics)",
        _yolo("yolov8n.yaml"),
        "camkit load_model('yolo:yolov8n.yaml', input_size=64)",
        "model.model.15",
        batch=1,
        task="detection",
        kind="yolo",
    ),
    Family(
        "yolo11n (ultralytics)",
        _yolo("yolo11n.yaml"),
        "camkit load_model('yolo:yolo11n.yaml', input_size=64)",
        "model.model.16",
        batch=1,
        task="detection",
        kind="yolo",
    ),
    Family(
        "CLIP ViT (open_clip, 2 prompts)",
        _open_clip_tiny,
        "open_clip CLIP(image_size=64, 2 blocks) as camkit from_open_clip(...)",
        "model.visual.transformer.resblocks.0",
        task="zero-shot",
        kind="clip",
    ),
]


def shared_pass_methods() -> list[str]:
    """Gradient and projection CAMs, all computed from one capture pass (sorted: the registry's order depends
    on which module imported which first)."""
    return sorted(
        n
        for n in method_names()
        if isinstance(METHODS[n], LayerMethod) and not METHODS[n].needs_classifier  # type: ignore[attr-defined]
    )


def attention_methods() -> list[str]:
    return sorted(n for n in method_names() if isinstance(METHODS[n], AttentionMethod))


def _target(fam: Family, model: nn.Module, x: torch.Tensor) -> object:
    if fam.kind == "seg":
        return tasks.SegmentationTarget(category=1)
    if fam.kind == "det":
        with torch.no_grad():
            det = model(x)[0]
        assert len(det["boxes"]) > 0
        return tasks.DetectionTarget(det["boxes"][0], label=int(det["labels"][0]))
    if fam.kind == "yolo":  # detections packed as Tensor[B, D, 6] by camkit's YOLO view
        with torch.no_grad():
            row = model(x)[0, 0]
        assert int(row[5]) >= 0
        return tasks.DetectionTarget(row[:4], label=int(row[5]))
    return None


def _check(expl: camkit.Explanation, fam: Family, name: str) -> None:
    assert expl.maps.shape == (fam.batch, fam.size, fam.size), name
    assert torch.isfinite(expl.maps).all(), name
    assert expl.maps.min() >= 0 and expl.maps.max() <= 1, name
    for r in expl.raw.values():
        assert torch.isfinite(r).all(), name


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family(fam: Family) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    model = fam.build().eval()
    x = (
        torch.rand(fam.batch, 3, fam.size, fam.size)
        if fam.kind in ("det", "yolo")
        else torch.randn(fam.batch, 3, fam.size, fam.size)
    )
    before = snapshot(model)
    row: dict[str, object] = {"constructor": fam.constructor, "task": fam.task, "auto": auto_layer(model, x)}
    assert row["auto"] == fam.auto
    target = _target(fam, model, x)
    methods = shared_pass_methods()
    res = camkit.compare(model, x, methods=methods, targets=target)
    for name in methods:
        _check(res[name], fam, name)
        row[name] = "yes"
    assert res["gradcam"].layers == [fam.auto]
    assert res["gradcam"].raw[fam.auto].abs().sum() > 0, "zero gradient at the auto layer"
    # CAM needs class targets and a GAP + Linear head after the layer: a clear ValueError otherwise.
    if fam.kind in ("seg", "det", "yolo"):
        row["cam"] = "no (not a classifier)"
    else:
        try:
            _check(camkit.explain(model, x, method="cam"), fam, "cam")
            row["cam"] = "yes"
        except ValueError as err:
            assert "CAM needs" in str(err)
            row["cam"] = "no (head is not GAP + Linear)"
    for name in attention_methods():
        if fam.kind == "clip" and name == "legrad":  # LeGrad projects tokens through a classifier head
            with pytest.raises(ValueError, match="LeGrad needs a ViT"):
                camkit.explain(model, x, method=name, targets=target)
            row[name] = "no (no classifier head)"
        elif fam.kind in ("vit", "clip"):
            _check(camkit.explain(model, x, method=name, targets=target), fam, name)
            row[name] = "yes"
        else:
            # The refusal explain() would raise after its shared pass, without that pass (CNNs: no forward).
            with pytest.raises(ValueError, match="self-attention"):
                attention_probabilities(model, x, output_fn(None))
            row[name] = "no (windowed attention)" if fam.kind == "swin" else "no (no self-attention)"
    assert_unchanged(before, model)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["cpu"] = round(time.process_time() - c0, 1)
    RESULTS[fam.name] = row


def render(results: dict[str, dict[str, object]]) -> str:
    """The compatibility table (markdown) from the matrix results."""
    methods = [*shared_pass_methods(), "cam", *attention_methods()]
    lines = [
        "# Compatibility",
        "",
        "Generated by `tests/adapters/test_families.py` (random weights, no downloads; `make compat` rewrites this file, and",
        'the test suite fails when it no longer matches what the matrix produces). "yes": the method ran and gave',
        "finite maps of the input's size in [0, 1], Grad-CAM's map at the automatic layer is not zero, and the",
        "model came back unchanged (weights, hooks, grad mode, requires_grad, train/eval). Perturbation methods",
        "(many forwards) are tested in their own files. Classification inputs are 64x64 (transformers built with",
        "`image_size=64` / `img_size=64`), segmentation 64x64, detection 128x128 with `min_size=max_size=128`,",
        "Ultralytics YOLO 64x64 (random weights from the package's configs, every detection kept). Targets: top-1",
        "class (zero-shot CLIP: the prompt of highest similarity); segmentation `SegmentationTarget(1)`;",
        "detection `DetectionTarget(first box)`.",
        "",
        "| family | built as | task | auto layer | " + " | ".join(methods) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " |",
    ]
    for fam in FAMILIES:
        r = results[fam.name]
        cells = [fam.name, f"`{r['constructor']}`", str(r["task"]), f"`{r['auto']}`"]
        cells += [str(r.get(m, "?")) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def test_compatibility_table_matches_the_matrix() -> None:
    missing = [f.name for f in FAMILIES if f.name not in RESULTS]
    if missing:
        pytest.skip(
            f"the whole matrix must run in this session to check the table (missing {missing[:3]}...)"
        )
    text = render(RESULTS)
    if os.environ.get("CAMKIT_WRITE_COMPAT"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.exists(), "docs/compatibility.md is missing: run `make compat`"
    assert DOC.read_text() == text, "docs/compatibility.md is out of date: run `make compat`"


# ----------------------------------------------------------------------------------------------- caller state


@pytest.fixture(scope="module")
def resnet():  # type: ignore[no-untyped-def]
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def xr() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def reference(resnet, xr):  # type: ignore[no-untyped-def]
    return camkit.compare(resnet, xr, methods=["gradcam", "layercam"])


def _same(res: dict[str, camkit.Explanation], ref: dict[str, camkit.Explanation]) -> None:
    for m, e in ref.items():
        assert res[m].layers == e.layers
        torch.testing.assert_close(res[m].maps, e.maps, rtol=1e-4, atol=1e-5)
        assert res[m].maps.max() > 0


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_inside_no_grad_and_inference_mode(resnet, xr, reference, context):
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        res = camkit.compare(resnet, xr, methods=["gradcam", "layercam"])
        assert not torch.is_grad_enabled()
    _same(res, reference)


def test_frozen_parameters(resnet, xr, reference):
    for p in resnet.parameters():
        p.requires_grad_(False)
    try:
        before = snapshot(resnet)
        res = camkit.compare(resnet, xr, methods=["gradcam", "layercam"])
        assert_unchanged(before, resnet)
    finally:
        for p in resnet.parameters():
            p.requires_grad_(True)
    _same(res, reference)


def test_data_parallel_names_with_and_without_prefix(resnet, xr, reference):
    dp = nn.DataParallel(resnet)
    before = snapshot(dp)
    _same(camkit.compare(dp, xr, methods=["gradcam", "layercam"]), reference)
    for name in ("layer4", "module.layer4"):
        assert camkit.explain(dp, xr, layers=name).layers == ["layer4"]
    assert_unchanged(before, dp)


def test_channels_last(resnet, xr, reference):
    model = resnet.to(memory_format=torch.channels_last)
    try:
        res = camkit.compare(model, xr.to(memory_format=torch.channels_last), methods=["gradcam", "layercam"])
    finally:
        resnet.to(memory_format=torch.contiguous_format)
    _same(res, reference)


def test_torch_compile_is_explained_through_the_eager_module(resnet, xr, reference):
    compiled = torch.compile(resnet)  # never run here: camkit hooks the original module (_orig_mod)
    res = camkit.compare(compiled, xr, methods=["gradcam", "layercam"])
    _same(res, reference)
    assert camkit.explain(compiled, xr, layers="_orig_mod.layer4").layers == ["layer4"]


def test_bfloat16_autocast_on_cpu(resnet, xr, reference):
    # Half precision on CUDA is untested here (no GPU); bfloat16 autocast exercises the same dtype paths on CPU.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = camkit.compare(resnet, xr, methods=["gradcam", "layercam"])
    for m, e in reference.items():
        assert res[m].maps.dtype == torch.float32 and torch.isfinite(res[m].maps).all()
        corr = torch.corrcoef(torch.stack([res[m].maps.flatten(), e.maps.flatten()]))[0, 1]
        assert corr > 0.9, (m, float(corr))


def test_float16_model_on_cpu(resnet, xr, reference):
    # A model in float16 (model.half(), as on a GPU): the dtype path of half precision, run on CPU.
    import copy

    half = copy.deepcopy(resnet).half()
    before = snapshot(half)
    res = camkit.compare(half, xr.half(), methods=["gradcam", "layercam"])
    for m, e in reference.items():
        assert res[m].maps.dtype == torch.float32 and torch.isfinite(res[m].maps).all()
        corr = torch.corrcoef(torch.stack([res[m].maps.flatten(), e.maps.flatten()]))[0, 1]
        assert corr > 0.999, (m, float(corr))
    for method in ("scorecam", "ablationcam"):
        opts = camkit.PerturbationOptions(top_channels=8)
        e = camkit.explain(half, xr.half(), method, perturbation=opts)
        assert e.maps.dtype == torch.float32 and torch.isfinite(e.maps).all() and e.maps.amax() > 0, method
    assert_unchanged(before, half)


# ----------------------------------------------------------------------------------------------- command line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "auto"),
    [
        ("resnet18", "layer4"),
        ("deit_tiny_distilled_patch16_224", "blocks.11.norm1"),
        ("swin_t", "features.7.1.norm1"),
    ],
)
def test_cli_explains_each_family_without_layer_or_reshape(tmp_path, model, auto):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from camkit.cli import app

    photo = tmp_path / "cat.jpg"
    camkit.sample_image("chelsea").save(photo)
    res = CliRunner().invoke(
        app, ["explain", str(photo), "--model", model, "--no-pretrained", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary[0]["layers"] == [auto]
    assert Image.open(tmp_path / _overlay_name(model)).size == Image.open(photo).size
    layers = CliRunner().invoke(app, ["layers", model])
    assert layers.exit_code == 0 and f"auto: {auto}" in layers.output


def _overlay_name(model: str) -> str:
    """``cat_<model>_gradcam.png``: the command names its files after the model unless it is the default."""
    from camkit.cli.common import ModelOptions

    return f"cat{ModelOptions(name=model).file_tag()}_gradcam.png"


def _photo(tmp_path: Path) -> Path:
    photo = tmp_path / "cat.jpg"
    camkit.sample_image("chelsea").save(photo)
    return photo


@pytest.mark.slow
def test_cli_explains_a_segmentation_model_without_target(tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from camkit.cli import app

    name = "deeplabv3_mobilenet_v3_large"
    photo = _photo(tmp_path)
    # the same random weights as the command's, to check its choice independently
    torch.manual_seed(0)
    loaded = camkit.load_model(name, pretrained=False, input_size=128)
    with torch.no_grad():
        pred = loaded.model(loaded.preprocess(camkit.load_image(photo)))["out"][0].argmax(0)
    counts = torch.bincount(pred.flatten(), minlength=21)
    counts[0] = 0  # background
    assert counts.max() > 0
    base = ["explain", str(photo), "--model", name, "--no-pretrained", "--input-size", "128"]
    for target, expected in ((None, int(counts.argmax())), ("cat", 8)):
        out = tmp_path / f"out_{target}"
        torch.manual_seed(0)
        res = CliRunner().invoke(app, [*base, "--out", str(out), *(["--target", target] if target else [])])
        assert res.exit_code == 0, res.output
        s = json.loads((out / "summary.json").read_text())[0]
        assert (s["task"], s["layers"], s["class"]) == ("segmentation", ["backbone.16"], expected)
        assert s["label"] == loaded.labels[expected]
        covered = float((pred == expected).float().mean())
        assert s["region"] == ("mask" if covered > 0 else "image")
        assert s["coverage"] == pytest.approx(covered, abs=1e-4)
        assert "SegmentationTarget" in res.output and f"class {expected} " in res.output
        assert Image.open(out / _overlay_name(name)).size == Image.open(photo).size


@pytest.mark.slow
def test_cli_explains_a_detection_model_without_target(tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from camkit.cli import app

    name = "fasterrcnn_mobilenet_v3_large_fpn"
    photo = _photo(tmp_path)
    pil = camkit.load_image(photo)
    torch.manual_seed(0)
    loaded = camkit.load_model(name, pretrained=False, input_size=128)
    tasks.set_score_threshold(loaded.model, 0.0)
    with torch.no_grad():
        det = loaded.model(loaded.preprocess(pil))[0]
    j = int(det["scores"].argmax())
    base = [
        "explain",
        str(photo),
        "--model",
        name,
        "--no-pretrained",
        "--input-size",
        "128",
        "--out",
        str(tmp_path),
    ]
    torch.manual_seed(0)
    res = CliRunner().invoke(app, [*base, "--det-threshold", "0"])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "summary.json").read_text())[0]
    assert (s["task"], s["region"], s["layers"]) == ("detection", "box", ["backbone.body.16"])
    assert s["class"] == int(det["labels"][j]) and s["label"] == loaded.labels[s["class"]]
    assert s["prob"] == pytest.approx(float(det["scores"][j]), rel=1e-4)
    scale = torch.tensor([pil.width / 128, pil.height / 128] * 2)
    assert s["box"] == pytest.approx((det["boxes"][j] * scale).tolist(), abs=0.06)
    assert "DetectionTarget" in res.output and "in image pixels" in res.output
    assert Image.open(tmp_path / _overlay_name(name)).size == pil.size
    # nothing scores above the threshold (random weights at the model's own one; here 1): a clean error
    res = CliRunner().invoke(app, [*base, "--det-threshold", "1"])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "no detection above the model's score threshold (1)" in res.output
    assert "--det-threshold 0" in res.output and "pretrained" in res.output
    assert "Traceback" not in res.output
