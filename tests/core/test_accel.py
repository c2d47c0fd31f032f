"""The batched inference forward (camkit.core.accel): folded + channels-last by default, checked once, deterministic,
cached per model and rebuilt when its weights change; opt-in ``torch.compile``; the user's own ``forward``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit import PerturbationOptions
from camkit.core import accel
from camkit.core.accel import CHECK_ROWS, AccelWarning, BatchForward, fold_batchnorm
from camkit.metrics._common import Forward
from testbed import assert_unchanged, snapshot


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    accel.clear_cache()


class Layouts(nn.Module):
    """Records the memory layout of the input each call gets; ``flatten`` picks how the map is flattened."""

    def __init__(self, flatten: str = "reshape") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.flatten = flatten
        self.seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1)
        a = self.conv(x)
        if self.flatten == "view":  # a layout-dependent model: .view fails on a channels-last map
            return self.fc(a.view(a.shape[0], -1))
        if self.flatten == "storage":  # layout-dependent without failing: reads the raw storage order
            return self.fc(
                a.permute(0, 2, 3, 1).reshape(a.shape[0], -1) if a.stride(1) == 1 else a.flatten(1)
            )
        return self.fc(a.flatten(1))


def _identity(out: object) -> Tensor:
    assert isinstance(out, Tensor)
    return out


def _identity(out: object) -> Tensor:
    assert isinstance(out, Tensor)
    return out


def test_first_batch_checked_once_then_channels_last() -> None:
    net = Layouts().eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.inference_mode():
        ref = net.fc(net.conv(x).flatten(1))
        ff = BatchForward(net, _identity)
        outs = [ff(x[:3]), ff(x[3:])]
        # a second forward of the same model reuses the checked path: no check rows
        again = BatchForward(net, _identity)(x[:3])
    assert ff.path == "channels-last"  # no BatchNorm: the model itself, with channels-last inputs
    # whole first batch channels-last, then its CHECK_ROWS rows as given (the check), then channels-last only
    assert CHECK_ROWS < 3 and net.seen == [True, False, True, True]
    torch.testing.assert_close(torch.cat(outs), ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, outs[0])  # the checked batch's output is the fast path's own: same bits


@pytest.mark.parametrize("kind", ["view", "storage"])
def test_layout_dependent_models_warn_once_and_run_as_given(kind: str) -> None:
    net = Layouts(kind).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode():
        ref = net(x)
        net.seen.clear()
        with pytest.warns(AccelWarning, match="channels-last forward of Layouts is not used") as got:
            ff = BatchForward(net, _identity)
            a, b = ff(x[:2]), ff(x[2:])
            BatchForward(net, _identity)(x)  # cached decision: no new warning, no new try
    assert len(got) == 1
    assert ("raised RuntimeError" in str(got[0].message)) == (kind == "view")
    assert ff.path == "plain"
    tried = [True] if kind == "view" else [True, False]  # "storage" runs, then the check rows disagree
    assert net.seen == [*tried, False, False, False], kind
    torch.testing.assert_close(torch.cat([a, b]), ref)


def test_off_setting_and_other_inputs() -> None:
    net = Layouts().eval()
    with torch.inference_mode():
        ff = BatchForward(net, _identity, channels_last=False)
        ff(torch.randn(2, 3, 8, 8))
        assert net.seen == [False] and ff.path == "plain"
    with pytest.raises(ValueError, match="channels_last must be None, True or False"):
        BatchForward(net, _identity, channels_last="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forward must be a callable"):
        PerturbationOptions(forward=3)  # type: ignore[arg-type]


def test_scorecam_and_metrics_same_with_and_without() -> None:
    net = Layouts("storage").eval()  # the check must turn channels-last off here, or the maps would differ
    before = snapshot(net)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(AccelWarning):
        maps = {
            cl: camkit.explain(
                net, x, "scorecam", "conv.2", perturbation=PerturbationOptions(channels_last=cl)
            ).maps
            for cl in (False, None)
        }
    torch.testing.assert_close(maps[None], maps[False])
    good = Layouts().eval()
    maps = {
        cl: camkit.explain(
            good, x, "scorecam", "conv.2", perturbation=PerturbationOptions(channels_last=cl)
        ).maps
        for cl in (False, None)
    }
    torch.testing.assert_close(maps[None], maps[False], rtol=1e-4, atol=1e-5)
    assert_unchanged(before, net)
    fwd = Forward(good, batch_size=2)
    with torch.inference_mode():
        out = fwd(torch.randn(5, 3, 8, 8))
    assert out.shape == (5, 5) and fwd.calls == 3 and fwd.images == 5 and fwd.fast.path == "channels-last"


def test_tune_allocator_in_a_child_process() -> None:
    import platform
    import subprocess
    import sys

    code = "from camkit.core.runtime import tune_allocator; print(tune_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out.strip() == ("True" if glibc else "False")


class ConvBN(nn.Module):
    """conv -> BN -> ReLU twice; ``skip``: the first conv's raw output is also added after the block (a use the
    fold would change)."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        for bn in (self.b1, self.b2):  # non-trivial statistics
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
        self.fc = nn.Linear(4, 3)
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        a = self.c1(x)
        h = torch.relu(self.b2(self.c2(torch.relu(self.b1(a)))))
        if self.skip:
            h = h + a
        return self.fc(h.mean(dim=(2, 3)))


def test_fold_batchnorm_copies_and_folds() -> None:
    net = ConvBN().eval()
    before = snapshot(net)
    x = torch.randn(4, 3, 8, 8)
    twin, n = fold_batchnorm(net, x[:1])
    assert twin is not net and n == 2
    assert isinstance(twin.b1, nn.Identity) and isinstance(twin.b2, nn.Identity)
    assert twin.c2.bias is not None  # a conv without bias gets one
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-5)
    assert_unchanged(before, net)
    assert isinstance(net.b1, nn.BatchNorm2d)
    assert fold_batchnorm(Layouts().eval(), x[:1])[1] == 0  # nothing to fold


def test_folded_channels_last_agrees_with_the_plain_model() -> None:
    net = ConvBN().eval()
    before = snapshot(net)
    x = torch.randn(6, 3, 8, 8)
    with torch.inference_mode():
        ff = BatchForward(net, _identity)
        out = torch.cat([ff(x[:4]), ff(x[4:])])
        ref = net(x)
    assert ff.path == "folded+channels-last"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert_unchanged(before, net)


def test_fold_that_changes_the_output_warns_once_and_keeps_the_layout() -> None:
    net = ConvBN(skip=True).eval()  # a conv output used outside its BatchNorm: the fold differs
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode(), pytest.warns(AccelWarning, match="folded\\+channels-last forward") as got:
        ff = BatchForward(net, _identity)
        out = torch.cat([ff(x[:2]), ff(x[2:])])
        ref = net(x)
    assert len(got) == 1 and ff.path == "channels-last"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_cache_is_rebuilt_after_an_in_place_weight_change() -> None:
    net = ConvBN().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        first = BatchForward(net, _identity)(x)
    entry = accel._CACHE[net]
    with torch.no_grad():
        net.c2.weight.mul_(-2.0)  # in place: same tensor object, new version
        net.b1.running_mean.add_(0.5)
    with torch.inference_mode():
        second = BatchForward(net, _identity)(x)
        ref = net(x)
    assert accel._CACHE[net] is not entry  # rebuilt, not served stale
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-6)
    # replaced parameters and a changed mode count as changes too
    entry = accel._CACHE[net]
    net.c1.weight = nn.Parameter(net.c1.weight.detach() * 0.5)
    with torch.inference_mode():
        third = BatchForward(net, _identity)(x)
        torch.testing.assert_close(third, net(x), rtol=1e-5, atol=1e-6)
    assert accel._CACHE[net] is not entry
    entry = accel._CACHE[net]
    with torch.inference_mode():
        BatchForward(net, _identity)(x)
    assert accel._CACHE[net] is entry  # unchanged model: served from the cache


def test_the_cache_does_not_keep_the_model_alive() -> None:
    import gc
    import weakref

    net = ConvBN().eval()
    with torch.inference_mode():
        BatchForward(net, _identity)(torch.randn(2, 3, 8, 8))
    alive = weakref.ref(net)
    del net
    gc.collect()
    assert alive() is None and len(accel._CACHE) == 0


def _resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.mark.parametrize(("method", "layer"), [("scorecam", "layer3"), ("ablationcam", "layer4")])
def test_same_call_twice_is_bitwise_identical(method: str, layer: str) -> None:
    net = _resnet18()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 48)
    opts = PerturbationOptions(top_channels=32, batch_size=24)  # 64 masks: batches of 24, 24, 16
    maps = []
    for clear in (False, False, True):  # first (checked), cached, freshly prepared again
        if clear:
            accel.clear_cache()
        maps.append(camkit.explain(net, x, method, layer, perturbation=opts).raw[layer])
    assert torch.equal(maps[0], maps[1]) and torch.equal(maps[0], maps[2])


def test_own_forward_is_used_and_gives_the_same_maps() -> None:
    net = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    calls: list[int] = []

    def run(inputs: Tensor) -> Tensor:
        calls.append(inputs.shape[0])
        return net(inputs)

    plain = camkit.explain(net, x, "scorecam", "c2", perturbation=PerturbationOptions(channels_last=False))
    own = camkit.explain(net, x, "scorecam", "c2", perturbation=PerturbationOptions(forward=run))
    assert sum(calls) == 2 * 4  # every masked input went through it (2 images x 4 channels)
    assert torch.equal(own.raw["c2"], plain.raw["c2"])


@pytest.mark.slow
def test_compiled_path_agrees_and_compiles_once(monkeypatch) -> None:
    compiles: list[nn.Module] = []
    real = accel._compile_model

    def counting(module: nn.Module) -> accel.ModelForward:
        compiles.append(module)
        return real(module)

    monkeypatch.setattr(accel, "_compile_model", counting)
    net = ConvBN().eval()
    before = snapshot(net)
    x = torch.randn(2, 3, 8, 8)
    opts = PerturbationOptions(batch_size=3)  # 8 masks: batches of 3, 3, 2 (the last one padded)
    default = camkit.explain(net, x, "scorecam", "c2", perturbation=opts).raw["c2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)  # no fallback
        fast = [
            camkit.explain(
                net, x, "scorecam", "c2", perturbation=PerturbationOptions(batch_size=3, compile="inductor")
            ).raw["c2"]
            for _ in range(2)
        ]
    assert len(compiles) == 1 and compiles[0] is not net  # once, on a copy, reused by the second call
    torch.testing.assert_close(fast[0], default, rtol=1e-4, atol=1e-6)
    assert torch.equal(fast[0], fast[1])
    assert_unchanged(before, net)
    fwd = Forward(net, batch_size=3, compile="inductor")  # the same batch shape: the same compiled copy
    with torch.inference_mode():
        out = fwd(torch.randn(5, 3, 8, 8))
    assert fwd.fast.path == "inductor" and out.shape == (5, 3) and len(compiles) == 1


def test_a_compiler_failure_warns_once_and_runs_the_default_path(monkeypatch) -> None:
    def broken(_module: nn.Module) -> accel.ModelForward:
        def run(_x: Tensor) -> Tensor:
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(accel, "_compile_model", broken)
    net = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    default = camkit.explain(net, x, "scorecam", "c2").raw["c2"]
    opts = PerturbationOptions(compile="inductor")
    with pytest.warns(
        AccelWarning, match="inductor forward of ConvBN is not used.*no C\\+\\+ compiler"
    ) as got:
        maps = [camkit.explain(net, x, "scorecam", "c2", perturbation=opts).raw["c2"] for _ in range(2)]
    assert len(got) == 1
    assert torch.equal(maps[0], default) and torch.equal(maps[1], default)


def _counting(monkeypatch, name: str = "_trace_model") -> list[nn.Module]:
    """The modules accel's backend function ``name`` (``_trace_model``, ``_onnx_model``) is called on."""
    seen: list[nn.Module] = []
    real = getattr(accel, name)

    def counting(module: nn.Module, example: Tensor) -> accel.ModelForward:
        seen.append(module)
        return real(module, example)

    monkeypatch.setattr(accel, name, counting)
    return seen


def test_jit_path_agrees_and_is_prepared_once(monkeypatch) -> None:
    traces = _counting(monkeypatch)
    net = ConvBN().eval()
    before = snapshot(net)
    x = torch.randn(2, 3, 8, 8)
    default = camkit.explain(net, x, "scorecam", "c2", perturbation=PerturbationOptions(batch_size=3)).raw[
        "c2"
    ]
    opts = PerturbationOptions(
        batch_size=3, compile="jit"
    )  # 8 masks: batches of 3, 3, 2 (the last one padded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, and torch.jit's deprecation warnings are silenced
        fast = [camkit.explain(net, x, "scorecam", "c2", perturbation=opts).raw["c2"] for _ in range(2)]
    assert len(traces) == 1 and traces[0] is not net  # once, on a copy, reused by the second call
    assert isinstance(traces[0].b1, nn.Identity)  # the folded copy is traced
    torch.testing.assert_close(fast[0], default, rtol=1e-4, atol=1e-6)
    assert torch.equal(fast[0], fast[1])
    assert_unchanged(before, net)
    fwd = Forward(net, batch_size=3, compile="jit")  # the same batch shape: the same traced copy
    with torch.inference_mode():
        out = fwd(torch.randn(5, 3, 8, 8))
    assert fwd.fast.path == "jit" and out.shape == (5, 3) and len(traces) == 1
    with torch.no_grad():
        net.c1.weight.mul_(0.5)  # a changed model is traced again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        changed = camkit.explain(net, x, "scorecam", "c2", perturbation=opts).raw["c2"]
    assert len(traces) == 2
    ref = camkit.explain(net, x, "scorecam", "c2", perturbation=PerturbationOptions(batch_size=3)).raw["c2"]
    torch.testing.assert_close(changed, ref, rtol=1e-4, atol=1e-6)


def test_compile_true_means_jit_on_cpu_without_onnxruntime(monkeypatch) -> None:
    traces = _counting(monkeypatch)
    monkeypatch.setattr(accel, "_compile_model", lambda _m: pytest.fail("inductor on CPU"))
    monkeypatch.setattr(accel, "onnx_available", lambda: False)
    net = ConvBN().eval()
    with torch.inference_mode():
        ff = BatchForward(net, _identity, compile=True)
        out = ff(torch.randn(4, 3, 8, 8))
    assert ff.path == "jit" and len(traces) == 1 and out.shape == (4, 3)


def test_compile_true_means_onnx_on_cpu_with_onnxruntime(monkeypatch) -> None:
    monkeypatch.setattr(accel, "_trace_model", lambda *_a: pytest.fail("jit with ONNX Runtime installed"))
    assert accel.onnx_available()  # camkit[onnx] is part of the test extra
    assert accel.compile_backend(True, torch.device("cpu")) == "onnx"
    assert accel.compile_backend(True, torch.device("cuda")) == "inductor"
    net = ConvBN().eval()
    with torch.inference_mode():
        ff = BatchForward(net, _identity, compile=True)
        out = ff(torch.randn(4, 3, 8, 8))
    assert ff.path == "onnx" and out.shape == (4, 3)


def test_onnx_path_agrees_is_prepared_once_and_deterministic(monkeypatch) -> None:
    exports = _counting(monkeypatch, "_onnx_model")
    net = ConvBN().eval()
    before = snapshot(net)
    x = torch.randn(2, 3, 8, 8)
    default = camkit.explain(net, x, "scorecam", "c2", perturbation=PerturbationOptions(batch_size=3)).raw[
        "c2"
    ]
    opts = PerturbationOptions(batch_size=3, compile="onnx")  # batches of 3, 3, 2 (the last one padded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, and the exporter's own warnings are not shown
        fast = [camkit.explain(net, x, "scorecam", "c2", perturbation=opts).raw["c2"] for _ in range(2)]
    assert len(exports) == 1 and exports[0] is not net and isinstance(exports[0].b1, nn.Identity)
    torch.testing.assert_close(fast[0], default, rtol=1e-4, atol=1e-6)
    assert torch.equal(fast[0], fast[1])
    assert_unchanged(before, net)
    fwd = Forward(net, batch_size=3, compile="onnx")  # the same batch shape: the same session
    with torch.inference_mode():
        out = fwd(torch.randn(7, 3, 8, 8))  # 3, 3 and 1 padded to 3
    assert fwd.fast.path == "onnx" and out.shape == (7, 3) and len(exports) == 1
    with torch.no_grad():
        expected = net(torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
        got = fwd(torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class DictOut(ConvBN):
    """A model whose output is a dict: the onnx backend does not take it."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": super().forward(x)}


def test_onnx_unsupported_output_or_device_falls_back_with_one_warning() -> None:
    net = DictOut().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        ref = BatchForward(net, lambda o: o["logits"])(x)
        with pytest.warns(AccelWarning, match="not a Tensor or a tuple of Tensors") as got:
            ff = BatchForward(net, lambda o: o["logits"], compile="onnx")
            out = [ff(x) for _ in range(2)]
    assert len([w for w in got if issubclass(w.category, AccelWarning)]) == 1
    assert ff.path != "onnx" and torch.equal(out[0], ref) and torch.equal(out[1], ref)
    with pytest.raises(accel._NotPrepared, match="CPU only"):
        accel._onnx_model(ConvBN().eval(), torch.empty(1, 3, 8, 8, device="meta"))


class Branchy(ConvBN):
    """Data-dependent control flow: tracing would bake in the branch of the example batch."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        if h.mean() > 0.5:
            h = -h
        return self.fc(h.mean(dim=(2, 3)))


def test_jit_trace_with_data_dependent_control_flow_falls_back_with_one_warning() -> None:
    net = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    default = camkit.explain(net, x, "scorecam", "c2").raw["c2"]
    opts = PerturbationOptions(compile="jit")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        maps = [camkit.explain(net, x, "scorecam", "c2", perturbation=opts).raw["c2"] for _ in range(2)]
    assert [w.category for w in got] == [AccelWarning], [str(w.message) for w in got]
    assert "jit forward of Branchy is not used" in str(got[0].message)
    assert "tracing it warned" in str(got[0].message)
    assert torch.equal(maps[0], default) and torch.equal(maps[1], default)


def test_jit_missing_in_torch_falls_back(monkeypatch) -> None:
    monkeypatch.delattr(torch.jit, "freeze")
    net = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    default = camkit.explain(net, x, "scorecam", "c2").raw["c2"]
    with pytest.warns(AccelWarning, match="no torch.jit.trace/freeze") as got:
        maps = camkit.explain(net, x, "scorecam", "c2", perturbation=PerturbationOptions(compile="jit"))
    assert len(got) == 1 and torch.equal(maps.raw["c2"], default)


@pytest.mark.parametrize("value", ["yes", "JIT", 1, None, "compiled"])
def test_invalid_compile_values_raise(value: object) -> None:
    for make in (
        lambda: PerturbationOptions(compile=value),  # type: ignore[arg-type]
        lambda: BatchForward(ConvBN().eval(), _identity, compile=value),  # type: ignore[arg-type]
        lambda: Forward(ConvBN().eval(), compile=value),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="compile must be False, True, 'jit', 'inductor' or 'onnx'"):
            make()


def test_jit_path_same_call_twice_is_bitwise_identical() -> None:
    net = _resnet18()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 48)
    opts = PerturbationOptions(
        top_channels=32, batch_size=24, compile="jit"
    )  # batches of 24, 24, 16 (padded)
    maps = []
    for clear in (False, False, True):  # first (checked), cached, freshly traced again
        if clear:
            accel.clear_cache()
        maps.append(camkit.explain(net, x, "scorecam", "layer3", perturbation=opts).raw["layer3"])
    assert torch.equal(maps[0], maps[1]) and torch.equal(maps[0], maps[2])
