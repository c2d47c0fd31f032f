"""Concurrency: many threads explaining with one shared model get exactly the single-thread results, and a plain
inference thread beside them is never changed (no grad mode turned on, no activation replaced, no attention path
switched)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence

import pytest
import torch
from torch import nn

import camkit
import camkit.core.accel
from camkit.core import layers as camkit_layers
from camkit.core.capture import hook_forward

METHODS = ["gradcam", "gradcam++", "layercam", "eigencam", "scorecam", "ablationcam", "cam"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, stride=2),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).eval()


def _concurrently(
    model: nn.Module,
    jobs: Sequence[Hashable],
    run: Callable[[Hashable], torch.Tensor],
    x_plain: torch.Tensor,
    n_threads: int,
    rounds: int,
    before_threads: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Run every job alone, then ``n_threads`` threads x ``rounds`` rounds of their share of the jobs next to a
    plain no_grad inference thread; assert bitwise equality, an untouched plain thread and an unchanged model.

    Returns:
        (explanations checked, plain forwards checked).
    """
    expected = {job: run(job) for job in dict.fromkeys(jobs)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: dict(vars(m)) for n, m in model.named_modules()}
    with torch.no_grad():
        y_plain = model(x_plain)
    if before_threads is not None:
        before_threads()

    failures: list[str] = []
    barrier = threading.Barrier(n_threads + 1)
    stop = threading.Event()
    done = [0]

    def worker(k: int) -> None:
        barrier.wait()
        for round_ in range(rounds):
            for job in jobs[k::n_threads]:
                try:
                    got = run(job)
                except Exception as err:
                    failures.append(f"thread {k} round {round_} {job}: {type(err).__name__}: {err}")
                    continue
                done[0] += 1
                if not torch.equal(got, expected[job]):
                    diff = float((got - expected[job]).abs().max())
                    failures.append(f"thread {k} round {round_} {job}: map differs (max abs {diff:.3g})")

    plain_runs = [0]

    def plain() -> None:
        barrier.wait()
        while not stop.is_set():
            grad_before = torch.is_grad_enabled()
            with torch.no_grad():
                y = model(x_plain)
            plain_runs[0] += 1
            if torch.is_grad_enabled() != grad_before:
                failures.append("the plain thread's grad mode changed")
            if y.requires_grad:
                failures.append("a plain no_grad forward returned an output that requires grad")
            if not torch.equal(y, y_plain):
                failures.append("a plain forward's output changed while explanations ran")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    side = threading.Thread(target=plain)
    for t in [*threads, side]:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stop.set()
    side.join(timeout=60)
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:20])
    assert done[0] == rounds * len(jobs)
    assert plain_runs[0] > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == flags, (
        "a module attribute was left changed"
    )
    return done[0], plain_runs[0]


@pytest.mark.parametrize("n_threads", [4])
def test_threads_equal_single_thread_results(n_threads: int) -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 16, 16, generator=g) for _ in range(6)]
    jobs = [(i % len(images), METHODS[i % len(METHODS)], i % 5) for i in range(3 * n_threads * 2)]
    layer = "4"

    def run(job: Hashable) -> torch.Tensor:
        i, method, target = job  # type: ignore[misc]
        return camkit.explain(model, images[i], method, layers=layer, targets=target).maps

    x_plain = torch.randn(2, 3, 16, 16, generator=g)
    start = time.perf_counter()
    # the threads prepare the perturbation methods' folded copy concurrently (camkit.core.accel's cache)
    n, plain = _concurrently(
        model, jobs, run, x_plain, n_threads, rounds=3, before_threads=camkit.core.accel.clear_cache
    )
    print(
        f"CNN: {n_threads} threads x {n // n_threads} calls, {plain} plain forwards, {time.perf_counter() - start:.1f} s"
    )


def test_threads_on_a_vit_with_attention_methods() -> None:
    """A timm ViT with fused attention: rollout and gradient rollout (which read the attention probabilities of
    the explaining thread only) and Grad-CAM with the automatic layer traced by several threads at once, next to
    a plain inference thread that must keep the fused path's exact output."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, num_classes=5
    ).eval()
    attns = [b.attn for b in model.blocks]
    assert all(a.fused_attn for a in attns)
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(1, 3, 32, 32, generator=g) for _ in range(4)]
    methods = ["rollout", "gradrollout", "gradcam"]
    n_threads = 3
    jobs = [(i % len(images), methods[i % len(methods)], i % 5) for i in range(4 * n_threads)]

    def run(job: Hashable) -> torch.Tensor:
        i, method, target = job  # type: ignore[misc]
        return camkit.explain(model, images[i], method, targets=target).maps

    x_plain = torch.randn(2, 3, 32, 32, generator=g)
    # The test can see a switched attention path: the unfused path gives other bits for this input.
    with torch.no_grad():
        fused = model(x_plain)
        for a in attns:
            a.fused_attn = False
        unfused = model(x_plain)
        for a in attns:
            a.fused_attn = True
    assert not torch.equal(fused, unfused)

    def forget_layers() -> None:  # the threads trace the automatic layer concurrently
        with camkit_layers._AUTO_LOCK:
            camkit_layers._AUTO_CACHE.clear()

    start = time.perf_counter()
    n, plain = _concurrently(model, jobs, run, x_plain, n_threads, rounds=2, before_threads=forget_layers)
    print(
        f"ViT: {n_threads} threads x {n // n_threads} calls, {plain} plain forwards, {time.perf_counter() - start:.1f} s"
    )


def test_hook_forward_acts_only_in_its_thread() -> None:
    model = _model()
    x = torch.randn(1, 3, 8, 8)
    calls: list[str] = []

    def replace(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        calls.append(threading.current_thread().name)
        return torch.zeros_like(out)

    handle = hook_forward(model[3], replace)
    try:
        outputs: list[torch.Tensor] = []
        other = threading.Thread(target=lambda: outputs.append(model(x)), name="other")
        other.start()
        other.join()
        mine = model(x)
    finally:
        handle.remove()
    assert calls == [threading.current_thread().name]
    assert not torch.equal(outputs[0], mine) and torch.equal(outputs[0], model(x))
    assert not model[3]._forward_hooks


def test_accel_cache_and_copies_ignore_other_calls_hooks() -> None:
    """Another thread's call with its hooks on the model is not a change of the model (the prepared copy stays
    valid) and its hooks never travel into a copy; a hook of the user's still counts."""
    model = _model()
    plain = camkit.core.accel._signature(model)
    handle = hook_forward(model[3], lambda *_: None, pre=True)
    try:
        assert camkit.core.accel._signature(model) == plain
        twin = camkit.core.accel._copy(model)
    finally:
        handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())
    user = model[3].register_forward_hook(lambda *_: None)
    try:
        assert camkit.core.accel._signature(model) != plain
    finally:
        user.remove()
