"""Numbers too large for torch in the command's options and in a perturbation method's seed: one ``error:`` line
with exit status 2 (or, for a seed that fits the spec, the same noise as before for every seed that worked), never
an OverflowError traceback with exit status 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import camkit
from camkit.cli import app
from camkit.methods.engine import _seed64

runner = CliRunner()
HUGE = "99999999999999999999"  # over 2**64


@pytest.mark.parametrize(
    ("option", "needle"),
    [(["--seed", HUGE], "--seed"), (["--seed", f"-{HUGE}"], "--seed"), (["--threads", HUGE], "--threads"),
     (["--samples", HUGE, "--method", "sscam"], "samples")],
)  # fmt: skip
def test_an_option_too_large_is_one_error(tmp_path: Path, option: list[str], needle: str) -> None:
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    args = ["explain", str(img), "--model", "squeezenet1_0", "--no-pretrained", "--out", str(tmp_path / "o")]
    res = runner.invoke(app, args + option)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output


def test_sscam_takes_any_64_bit_seed_and_keeps_the_noise_of_small_ones() -> None:
    assert _seed64(5 * 1_000_003 + 7) == 5 * 1_000_003 + 7
    assert _seed64(-3) == -3  # torch maps negative seeds itself
    assert _seed64(2**63 * 1_000_003) == (2**63 * 1_000_003) % 2**64
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)
    )
    x = torch.rand(1, 3, 8, 8)
    for seed in (2**62, -(2**63), 2**63 - 1):
        maps = camkit.explain(model.eval(), x, f"sscam(seed={seed},samples=2)", layers="0").maps
        assert torch.isfinite(maps).all()


def test_a_size_beyond_the_memory_is_one_error_not_a_bug_report(tmp_path: Path) -> None:
    """A method setting within 64 bits but far beyond the machine's memory: the allocation fails at once, and the
    command says so in one line (exit status 2), not as a bug of camkit's (exit status 3)."""
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    args = ["explain", str(img), "--model", "squeezenet1_0", "--no-pretrained", "--out", str(tmp_path / "o")]
    res = runner.invoke(app, [*args, "--method", f"sscam(samples={2**40})"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "bug" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of memory" in errors[0] and "GiB" in errors[0], res.output


def test_out_of_memory_recognises_only_allocation_failures() -> None:
    from camkit.cli import out_of_memory

    assert out_of_memory(MemoryError()) is not None
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) is not None
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(ValueError("x")) is None
