"""Concurrency: many threads explaining with one shared model get exactly the single-thread results, and a plain
inference thread beside them is never changed (no grad mode turned on, no activation replaced)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import camkit

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


@pytest.mark.parametrize("n_threads", [4])
def test_threads_equal_single_thread_results(n_threads: int) -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 16, 16, generator=g) for _ in range(6)]
    jobs = [(i % len(images), METHODS[i % len(METHODS)], i % 5) for i in range(3 * n_threads * 2)]
    layer = "4"

    def run(job: tuple[int, str, int]) -> torch.Tensor:
        i, method, target = job
        return camkit.explain(model, images[i], method, layers=layer, targets=target).maps

    expected = {job: run(job) for job in set(jobs)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_plain = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        y_plain = model(x_plain)

    failures: list[str] = []
    barrier = threading.Barrier(n_threads + 1)
    stop = threading.Event()

    def worker(k: int) -> None:
        barrier.wait()
        for round_ in range(3):
            for job in jobs[k::n_threads]:
                try:
                    got = run(job)
                except Exception as err:
                    failures.append(f"thread {k} round {round_} {job}: {type(err).__name__}: {err}")
                    continue
                if not torch.equal(got, expected[job]):
                    diff = float((got - expected[job]).abs().max())
                    failures.append(f"thread {k} round {round_} {job}: map differs (max abs {diff:.3g})")

    plain_runs = [0]

    def plain() -> None:
        barrier.wait()
        while not stop.is_set():
            with torch.no_grad():
                y = model(x_plain)
            plain_runs[0] += 1
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
    assert not failures, "\n".join(failures[:20])
    assert plain_runs[0] > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
