"""The gradient capture's compiled split (camkit.core.split): with ``compile=``, the prepared copy is cut by torch.fx
before its earliest target layer, the prefix compiled and run without gradients, the suffix eager with the hooks.
The maps equal the default path's for every layer method kind, a model fx cannot trace falls back with one
warning, the user's model is untouched, threads share the split."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

import camkit
from camkit import PerturbationOptions
from camkit.core import accel, split
from camkit.core.accel import AccelWarning
from camkit.core.split import SplitCopy, split_graph, trace_with_leaves
from testbed import assert_unchanged, in_threads, randomize_norms, snapshot

SIDE = 32
JIT = PerturbationOptions(compile="jit")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    accel.clear_cache()
    yield
    accel.clear_cache()


def _norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that the fold changes the weights."""
    return randomize_norms(model, bias=False)


class TinyResNet(nn.Module):
    """A stem and two ResNet stages (torchvision's BasicBlock; the second with a downsampling shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(BasicBlock(8, 8))
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.stage2 = nn.Sequential(BasicBlock(8, 16, stride=2, downsample=down), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stage2(self.stage1(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))


class Branchy(TinyResNet):
    """Data-dependent Python control flow in its own forward: torch.fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.stage1(self.stem(x))
        if float(h.mean()) > 1e9:  # never true; reads data
            h = h * 0
        return self.fc(self.stage2(h).mean(dim=(2, 3)))


def _x(n: int = 2) -> Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def _splits(model: nn.Module) -> list[SplitCopy]:
    entry = accel._CACHE.get(model)
    return [s for s in ([] if entry is None else entry.kept.values()) if isinstance(s, SplitCopy)]


def _same(fast: dict[str, camkit.Explanation], plain: dict[str, camkit.Explanation]) -> None:
    for name, e in plain.items():
        f = fast[name]
        assert torch.equal(e.classes, f.classes), name
        torch.testing.assert_close(f.maps, e.maps, rtol=0, atol=1e-5, msg=name)
        for layer, raw in e.raw.items():
            scale = float(raw.abs().max()) or 1.0
            torch.testing.assert_close(f.raw[layer], raw, rtol=0, atol=1e-5 * scale, msg=f"{name} {layer}")


@pytest.mark.parametrize(
    ("methods", "layers"),
    [
        (["gradcam", "gradcam++", "layercam"], "stage2"),  # a container (a ResNet stage)
        (["gradcam", "hirescam"], "stage2.0.conv1"),  # inside a residual block: the shortcut crosses the cut
        (["layercam", "xgradcam"], ["stem", "stage1", "stage2"]),  # layers at three depths, maps fused
    ],
)
@pytest.mark.parametrize("backend", ["jit", "onnx"])
def test_compiled_split_gives_the_default_maps(
    methods: list[str], layers: str | list[str], backend: accel.Compile
) -> None:
    net, x = _norms(TinyResNet()), _x()
    before = snapshot(net)
    plain = camkit.compare(net, x, methods, layers)
    opts = PerturbationOptions(compile=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)  # no fallback
        fast = camkit.compare(net, x, methods, layers, perturbation=opts)
        again = camkit.compare(net, x, methods, layers, perturbation=opts)  # the checked split, reused
    (used,) = _splits(net)
    assert used.failed is None and used.checked(x) and used.backend == backend
    _same(fast, plain)
    assert all(torch.equal(again[m].maps, fast[m].maps) for m in methods)  # deterministic
    assert_unchanged(before, net)


def test_each_input_shape_gets_its_own_checked_prefix() -> None:
    net = _norms(TinyResNet())
    for n in (2, 3):
        x = _x(n)
        with warnings.catch_warnings():
            warnings.simplefilter("error", AccelWarning)
            fast = camkit.explain(net, x, "gradcam", "stage2", perturbation=JIT)
        torch.testing.assert_close(
            fast.maps, camkit.explain(net, x, "gradcam", "stage2").maps, rtol=0, atol=1e-5
        )
    (used,) = _splits(net)
    assert used.checked(_x(2)) and used.checked(_x(3)) and len(used._runs) == 2


def test_the_cut_passes_the_shortcut_and_keeps_the_target_modules() -> None:
    net = _norms(TinyResNet())
    target = {"stage2.0.conv1": net.stage2[0].conv1}
    gm = trace_with_leaves(net, list(target.values()))
    prefix, suffix, replaced = split_graph(gm, target)
    assert not replaced
    assert suffix.get_submodule("stage2.0.conv1") is net.stage2[0].conv1  # the very module: hooks fire on it
    assert not any(n.target == "stage2.0.conv1" for n in prefix.graph.nodes)
    x = _x()
    with torch.no_grad():
        values = prefix(x)
        assert len(values) == 1  # the block's input, read by conv1 and by the downsampling shortcut
        torch.testing.assert_close(suffix(*values), net(x))


def test_the_prefix_computes_the_first_target_when_it_is_called_once() -> None:
    net = _norms(TinyResNet())
    target = {"stage2.0.conv1": net.stage2[0].conv1, "stage2.1": net.stage2[1]}
    gm = trace_with_leaves(net, list(target.values()))
    prefix, suffix, replaced = split_graph(gm, target, through=True)
    assert list(replaced) == ["stage2.0.conv1"] and isinstance(replaced["stage2.0.conv1"], split.TargetOutput)
    assert any(n.target == "stage2.0.conv1" for n in prefix.graph.nodes)  # computed before the cut
    called = [n.target for n in suffix.graph.nodes if n.op == "call_module"]
    assert called[0] == "_camkit_target_output" and "stage2.0.conv1" not in called and "stage2.1" in called
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(suffix(*prefix(x)), net(x))
    # through a cut there, the capture sees the layer's output on the stand-in: the maps are the default ones
    plain = camkit.compare(net, x, ["gradcam", "layercam"], list(target))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        fast = camkit.compare(net, x, ["gradcam", "layercam"], list(target), perturbation=JIT)
    (used,) = _splits(net)
    assert isinstance(used.layers["stage2.0.conv1"], split.TargetOutput)
    assert type(used.layers["stage2.1"]) is BasicBlock  # the later target: the copy's own module
    _same(fast, plain)


class Twice(TinyResNet):
    """Calls its last stage's second block twice: that module cannot be computed before the cut."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.stage2[0](self.stage1(self.stem(x)))
        h = self.stage2[1](self.stage2[1](h))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore:layer 'stage2.1' ran 2 times")
def test_a_target_called_twice_stays_after_the_cut() -> None:
    net, x = _norms(Twice()), _x()
    layer = {"stage2.1": net.stage2[1]}
    gm = trace_with_leaves(net, list(layer.values()))
    _prefix, suffix, replaced = split_graph(gm, layer, through=True)
    assert not replaced
    assert [n.target for n in suffix.graph.nodes if n.op == "call_module"][:2] == ["stage2.1", "stage2.1"]
    plain = camkit.explain(net, x, "gradcam", "stage2.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        fast = camkit.explain(net, x, "gradcam", "stage2.1", perturbation=JIT)
    torch.testing.assert_close(fast.maps, plain.maps, rtol=0, atol=1e-5)


def test_a_module_fx_cannot_trace_into_stays_whole() -> None:
    from timm.layers import Conv2dSame
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    arch = decode_arch_def([["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e2_c16"]])
    net = _norms(EfficientNet(arch, num_classes=5, stem_size=8, num_features=24, pad_type="same"))
    gm = trace_with_leaves(net, [net.bn2])  # Conv2dSame computes its padding from the input's size in Python
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "conv_stem" in leaves and isinstance(net.conv_stem, Conv2dSame)
    x = _x()
    plain = camkit.explain(net, x, "gradcam", "bn2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        fast = camkit.explain(net, x, "gradcam", "bn2", perturbation=JIT)
    (used,) = _splits(net)
    assert used.failed is None and used.checked(x)
    torch.testing.assert_close(fast.maps, plain.maps, rtol=0, atol=1e-5)


def test_an_untraceable_model_falls_back_with_one_warning() -> None:
    net, x = _norms(Branchy()), _x()
    before = snapshot(net)
    plain = camkit.compare(net, x, ["gradcam", "layercam"], "stage2")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = camkit.compare(net, x, ["gradcam", "layercam"], "stage2", perturbation=JIT)
        camkit.compare(net, x, ["gradcam", "layercam"], "stage2", perturbation=JIT)
    found = [w for w in seen if issubclass(w.category, AccelWarning)]
    assert len(found) == 1 and "torch.fx cannot trace it" in str(found[0].message)
    for name in plain:
        assert torch.equal(fast[name].maps, plain[name].maps)  # the uncompiled prepared copy ran it
    assert_unchanged(before, net)


def test_a_compiler_failure_or_a_disagreement_drops_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    net, x = _norms(TinyResNet()), _x()
    plain = camkit.explain(net, x, "gradcam", "stage2")

    def off(module: nn.Module, example: Tensor, backend: str) -> accel.ModelForward:
        def run(inp: Tensor) -> tuple[Tensor, ...]:
            return tuple(v * 1.01 for v in module(inp))

        return run

    def broken(module: nn.Module, example: Tensor, backend: str) -> accel.ModelForward:
        raise RuntimeError("no C++ compiler")

    for fake, why in ((off, "differs from the model's"), (broken, "no C++ compiler")):
        accel.clear_cache()
        monkeypatch.setattr(split, "compiled_forward", fake)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fast = camkit.explain(net, x, "gradcam", "stage2", perturbation=JIT)
        found = [w for w in seen if issubclass(w.category, AccelWarning)]
        assert len(found) == 1 and why in str(found[0].message), [str(w.message) for w in found]
        assert torch.equal(fast.maps, plain.maps)
        assert all(s.failed is not None for s in _splits(net))


def test_threads_share_the_split() -> None:
    net, x = _norms(TinyResNet()), _x(3)
    expected = camkit.explain(net, x, "gradcam++", "stage2", perturbation=JIT).maps
    before = snapshot(net)
    out = in_threads(
        lambda: camkit.explain(net, x, "gradcam++", "stage2", perturbation=JIT).maps, threads=2, calls=3
    )
    assert len(out) == 6
    assert all(torch.equal(m, expected) for m in out)
    assert_unchanged(before, net)


class _Gate(nn.Module):
    """Holds a trace in its forward until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x: Tensor) -> Tensor:
        self.entered.set()
        self.release.wait(10)
        return x


def test_tracing_leaves_other_threads_forwards_alone() -> None:
    gate = _Gate()
    traced = nn.Sequential(nn.Conv2d(3, 4, 1), gate)
    other, x = _norms(TinyResNet()), _x()
    with torch.no_grad():
        expected = other(x)
    done: list[object] = []
    tracer = threading.Thread(target=lambda: done.append(trace_with_leaves(traced, [traced[0]])))
    tracer.start()
    try:
        assert gate.entered.wait(10)
        with torch.no_grad():  # torch.fx has patched nn.Module.__call__ for the whole process just now
            got = other(x)
    finally:
        gate.release.set()
        tracer.join()
    assert torch.equal(got, expected) and len(done) == 1


def test_without_compile_no_split_is_made() -> None:
    net, x = _norms(TinyResNet()), _x()
    camkit.explain(net, x, "gradcam", "stage2")
    camkit.explain(net, x, "gradcam", "stage2", perturbation=JIT, accelerate=False)
    assert not _splits(net)


@pytest.mark.slow  # inductor's first compile in a process: about 10 s
def test_inductor_split_gives_the_default_maps() -> None:
    net, x = _norms(TinyResNet()), _x()
    plain = camkit.explain(net, x, "gradcam", "stage1")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        fast = camkit.explain(
            net, x, "gradcam", "stage1", perturbation=PerturbationOptions(compile="inductor")
        )
    print(f"inductor split prepared and run in {time.perf_counter() - start:.1f} s")
    (used,) = _splits(net)
    assert used.failed is None and used.backend == "inductor"
    torch.testing.assert_close(fast.maps, plain.maps, rtol=0, atol=1e-5)


def test_onnx_split_of_the_pretrained_default_model_gives_the_default_maps() -> None:
    """The pretrained EfficientNet-Lite0 at its default layer: the part before ``bn2`` (nearly the whole network,
    timm's same-padding convolutions included) runs in ONNX Runtime; maps within 1e-5, the same classes."""
    loaded = camkit.load_model()
    net = loaded.model
    before = snapshot(net)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    plain = camkit.compare(net, x, ["gradcam", "gradcam++"])
    opts = PerturbationOptions(compile="onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        fast = camkit.compare(net, x, ["gradcam", "gradcam++"], perturbation=opts)
        again = camkit.compare(net, x, ["gradcam", "gradcam++"], perturbation=opts)
    (used,) = _splits(net)
    assert (
        used.failed is None
        and used.backend == "onnx"
        and isinstance(used._runs[next(iter(used._runs))]._prefix, accel.OnnxForward)
    )
    _same(fast, plain)
    assert all(torch.equal(again[m].maps, fast[m].maps) for m in plain)
    assert_unchanged(before, net)


def test_onnx_split_threads_share_one_session() -> None:
    net, x = _norms(TinyResNet()), _x(3)
    opts = PerturbationOptions(compile="onnx")
    expected = camkit.explain(net, x, "gradcam", "stage2", perturbation=opts).maps
    out = in_threads(
        lambda: camkit.explain(net, x, "gradcam", "stage2", perturbation=opts).maps, threads=2, calls=3
    )
    assert all(torch.equal(m, expected) for m in out)
    (used,) = _splits(net)
    assert len(used._runs) == 1


def test_onnx_without_onnxruntime_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "onnx_available", lambda: False)
    net, x = _norms(TinyResNet()), _x()
    plain = camkit.explain(net, x, "gradcam", "stage2")
    opts = PerturbationOptions(compile="onnx")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = [camkit.explain(net, x, "gradcam", "stage2", perturbation=opts) for _ in range(2)]
    found = [str(w.message) for w in seen if issubclass(w.category, AccelWarning)]
    assert len(found) == 1 and "pip install 'camkit[onnx]'" in found[0], found
    assert all(torch.equal(f.maps, plain.maps) for f in fast)
