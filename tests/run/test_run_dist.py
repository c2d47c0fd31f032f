"""``torchrun --nproc-per-node 2 -m camkit run``: two processes (gloo, CPU) give the same store as one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_run import MODEL_ARGS, assert_same_store, make_images

from camkit.run import open_store

SRC = Path(__file__).resolve().parents[2] / "src"


def test_torchrun_two_processes_equal_one(tmp_path: Path) -> None:
    data = make_images(tmp_path / "d", 44, bad=(5,))
    common = [
        *MODEL_ARGS,
        "--shard-size",
        "8",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--methods",
        "gradcam,layercam",
    ]
    env = dict(
        os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    one = subprocess.run(
        [sys.executable, "-m", "camkit", "run", str(data), "--out", str(tmp_path / "one"), *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 1, one.stderr  # one unreadable image
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "camkit",
            "run",
            str(data),
            "--out",
            str(tmp_path / "two"),
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 1, two.stderr
    assert "2 process(es)" in two.stdout  # rank 0 printed the summary of the whole run
    assert two.stdout.count("images explained") == 1  # only rank 0 prints
    assert_same_store(tmp_path / "one", tmp_path / "two")
    summary = open_store(tmp_path / "two").summary()
    assert summary["this_run"]["processes"] == 2 and summary["this_run"]["computed"] == 44
    # each rank wrote its own shards: 6 shards dealt 0,2,4 / 1,3,5; all present exactly once
    assert sorted(int(p.stem) for p in (tmp_path / "two" / "shards").glob("*.done")) == list(range(6))


def test_rank_from_torchrun_or_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    from camkit.run.distributed import env_rank, session

    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "MASTER_ADDR",
    ):
        monkeypatch.delenv(k, raising=False)
    assert env_rank() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_rank() == (3, 4, 1)
    with pytest.raises(ValueError, match="MASTER_ADDR"), session("cpu"):
        pass
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_rank() == (1, 2, 1)  # torchrun's variables first
