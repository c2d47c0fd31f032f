"""The own-pass methods (FullGrad, guided backprop, Guided Grad-CAM, ShapleyCAM) in several threads on one shared
model: each gets the single-thread result, and a thread beside them that takes the ordinary input gradient never
sees the guided ReLU rule nor a FullGrad hook's copy."""

from __future__ import annotations

import threading

import torch
from torch import nn

import camkit

METHODS = ["fullgrad", "guided-backprop", "guided-gradcam", "shapleycam"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, stride=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(12, 12, 1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).eval()


def test_own_pass_methods_in_threads_equal_single_thread_results_and_leave_a_plain_gradient_alone() -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 16, 16, generator=g) for _ in range(4)]
    jobs = [(i, m) for i, m in enumerate(METHODS)] * 2  # each thread runs every method once

    def run(job: tuple[int, str]) -> torch.Tensor:
        i, method = job
        return camkit.explain(model, images[i], method, layers="3", targets=1).maps

    expected = {job: run(job) for job in dict.fromkeys(jobs)}
    x_plain = torch.randn(2, 3, 16, 16, generator=g).requires_grad_(True)
    (grad_plain,) = torch.autograd.grad(model(x_plain)[:, 2].sum(), [x_plain])

    failures: list[str] = []
    barrier = threading.Barrier(3)
    stop = threading.Event()
    plain_runs = [0]

    def worker(k: int) -> None:
        barrier.wait()
        for job in jobs[k * len(METHODS) : (k + 1) * len(METHODS)]:
            try:
                if not torch.equal(run(job), expected[job]):
                    failures.append(f"{job}: map differs")
            except Exception as err:  # reported below
                failures.append(f"{job}: {type(err).__name__}: {err}")

    def plain() -> None:
        barrier.wait()
        while not stop.is_set():
            (grad,) = torch.autograd.grad(model(x_plain)[:, 2].sum(), [x_plain])
            plain_runs[0] += 1
            if not torch.equal(grad, grad_plain):
                failures.append("the plain thread's input gradient changed")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    side = threading.Thread(target=plain)
    for t in [*threads, side]:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    side.join(timeout=60)
    assert not failures, "\n".join(failures[:10])
    assert plain_runs[0] > 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
