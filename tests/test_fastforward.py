"""Channels-last inference forwards (camkit._fastforward): used only where they run and agree."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit import PerturbationOptions
from camkit._fastforward import CHECK_ROWS, FastForward
from camkit.metrics._common import Forward
from conftest import assert_unchanged, snapshot


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


def test_first_batch_checked_then_channels_last() -> None:
    net = Layouts().eval()
    ff = FastForward(net, _identity)
    x = torch.randn(6, 3, 8, 8)
    with torch.inference_mode():
        ref = net.fc(net.conv(x).flatten(1))
        outs = [ff(x[:3]), ff(x[3:])]
    assert ff.active is True
    # plain + channels-last on the first batch's first CHECK_ROWS rows, then channels-last only (rest of the first
    # batch, second batch)
    assert CHECK_ROWS < 3 and net.seen == [False, True, True, True]
    torch.testing.assert_close(torch.cat(outs), ref, rtol=1e-4, atol=1e-5)


def test_layout_dependent_models_run_as_given() -> None:
    for kind in ("view", "storage"):
        net = Layouts(kind).eval()
        ff = FastForward(net, _identity)
        x = torch.randn(4, 3, 8, 8)
        with torch.inference_mode():
            ref = net(x)
            net.seen.clear()
            a, b = ff(x[:2]), ff(x[2:])
        assert ff.active is False, kind
        assert net.seen == [False, True, False], kind  # tried once, then never again
        torch.testing.assert_close(torch.cat([a, b]), ref)


def test_off_and_gpu_only_settings() -> None:
    net = Layouts().eval()
    with torch.inference_mode():
        FastForward(net, _identity, channels_last=False)(torch.randn(2, 3, 8, 8))
        assert net.seen == [False]
        net.seen.clear()
        ff = FastForward(net, _identity)
        assert not ff._applies(torch.randn(3, 8, 8))  # not an image batch: as given
        assert not ff._applies(torch.randn(2, 3, 8, 8, device="meta"))  # not on CPU: as given unless asked
        assert FastForward(net, _identity, channels_last=True)._applies(
            torch.randn(2, 3, 8, 8, device="meta")
        )


def test_scorecam_and_metrics_same_with_and_without() -> None:
    net = Layouts("storage").eval()  # the check must turn channels-last off here, or the maps would differ
    before = snapshot(net)
    x = torch.randn(2, 3, 8, 8)
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
    assert out.shape == (5, 5) and fwd.calls == 3 and fwd.images == 5 and fwd.fast.active is True


def test_tune_allocator_in_a_child_process() -> None:
    import platform
    import subprocess
    import sys

    code = "import camkit; print(camkit.tune_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out.strip() == ("True" if glibc else "False")


def test_the_command_tunes_the_allocator(monkeypatch) -> None:
    from camkit import cli, runtime

    calls: list[str] = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("tune") or True)
    monkeypatch.setattr(cli, "app", lambda: calls.append("app"))
    cli.main()
    assert calls == ["tune", "app"]


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
    from camkit._fastforward import fold_batchnorm

    net = ConvBN().eval()
    before = snapshot(net)
    x = torch.randn(4, 3, 8, 8)
    twin = fold_batchnorm(net, x[:1])
    assert twin is not None and twin is not net
    assert isinstance(twin.b1, nn.Identity) and isinstance(twin.b2, nn.Identity)
    assert twin.c2.bias is not None  # a conv without bias gets one
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-5)
    assert_unchanged(before, net)
    assert isinstance(net.b1, nn.BatchNorm2d)
    assert fold_batchnorm(Layouts().eval(), x[:1]) is None  # nothing to fold


@pytest.mark.parametrize("fusion", [True, False])
def test_fast_path_choice(monkeypatch, fusion: bool) -> None:
    from camkit import _fusion

    if not fusion:  # a PyTorch build without oneDNN's fused operators
        monkeypatch.setattr(_fusion, "available", lambda: False)
    elif not _fusion.available():
        pytest.skip("this PyTorch build has no oneDNN fused convolution")
    x = torch.randn(4, 3, 8, 8)
    fused = "fused+" if fusion else ""
    with torch.inference_mode():
        for skip, path in ((False, f"folded+{fused}channels-last"), (True, f"{fused}channels-last")):
            net = ConvBN(skip).eval()
            before = snapshot(net)
            ff = FastForward(net, _identity)
            outs = torch.cat([ff(x[:2]), ff(x[2:])])
            assert ff.path == path, skip
            torch.testing.assert_close(outs, net(x), rtol=1e-4, atol=1e-5)
            assert_unchanged(before, net)


def test_first_batch_split_and_batch_dependent_outputs() -> None:
    net = Layouts().eval()
    x = torch.randn(5, 3, 8, 8)

    def padded(out: object) -> Tensor:  # width depends on the batch, like padded detections
        assert isinstance(out, Tensor)
        return out.repeat(1, out.shape[0])

    with torch.inference_mode():
        ref = padded(net(x))
        net.seen.clear()
        ff = FastForward(net, padded)
        out = ff(x)
    assert ff.active is True and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # the check rows twice, the rest once, then (the halves cannot be joined) the whole batch again
    assert net.seen == [False, True, True, True]
