"""`camkit evaluate` through the command, against another version of camkit or other options, interleaved.

    .venv/bin/python benchmarks/bench_evaluate_cli.py photos /tmp/photos32 32   # the timing photos as PNG files
    git worktree add /tmp/camkit-old ad8f911^                                  # an older version, beside this one
    .venv/bin/python benchmarks/bench_evaluate_cli.py run /tmp/photos32 old=/tmp/camkit-old/src now=src \\
        "now-compile=src --compile" --rounds 2

``photos``: writes the 32 images of ``bench_evaluate.py timing`` (offline photos, flipped and cropped) as PNG
files into a new folder. ``run``: each contender ``LABEL=SRC [OPTIONS]`` runs ``python -m camkit evaluate DIR
--methods gradcam,gradcam++,xgradcam,hirescam,layercam --metrics deletion,insertion --steps 50 OPTIONS`` with
``PYTHONPATH=SRC`` (the camkit found there, the rest from this environment), in its own process, the contenders
interleaved, ``--rounds`` times. It prints the wall time of each process (start-up and model load included), the
load average (``os.getloadavg()``) before and after each, the first contender's best time over each one's best,
and how far each contender's numbers are from the first's (largest difference of each CSV column, and how many
rows differ by more than 1e-5). The results go to a temporary folder (``--out`` to keep them elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = "gradcam,gradcam++,xgradcam,hirescam,layercam"
COLUMNS = ("prob", "deletion", "insertion")


def write_photos(folder: Path, n: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_evaluate import photos, variants

    folder.mkdir(parents=True)
    for name, im in variants(photos(), n):
        im.save(folder / f"{name}.png")
    print(f"{n} photos written to {folder}")


def _contender(text: str) -> tuple[str, Path, list[str]]:
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"error: a contender is LABEL=SRC [OPTIONS], got {text!r}")
    src, *options = rest.split()
    if not (Path(src) / "camkit").is_dir():
        raise SystemExit(f"error: {src} holds no camkit package (give the src folder of a checkout)")
    return label, Path(src).resolve(), options


def _rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as f:
        return {(r["image"], r["method"]): r for r in csv.DictReader(f)}


def _differences(first: Path, other: Path) -> str:
    a, b = _rows(first), _rows(other)
    if a.keys() != b.keys():
        return "different rows"
    parts = []
    for col in COLUMNS:
        diffs = [abs(float(a[k][col]) - float(b[k][col])) for k in a]
        parts.append(f"{col} {max(diffs):.1e} ({sum(d > 1e-5 for d in diffs)} > 1e-5)")
    return ", ".join(parts)


def run(folder: Path, contenders: list[str], rounds: int, out: Path) -> None:
    chosen = [_contender(c) for c in contenders]
    times: dict[str, list[float]] = {label: [] for label, _, _ in chosen}
    print("| round | contender | seconds | load before | load after |\n|---|---|---|---|---|")
    for r in range(1, rounds + 1):
        for label, src, options in chosen:
            dest = out / f"{label}.{r}"
            cmd = [sys.executable, "-m", "camkit", "evaluate", str(folder), "--methods", METHODS]
            cmd += ["--metrics", "deletion,insertion", "--steps", "50", "--no-progress", "--out", str(dest)]
            env = {**os.environ, "PYTHONPATH": str(src)}
            before, start = os.getloadavg()[0], time.perf_counter()
            done = subprocess.run([*cmd, *options], env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"error: {label} exited {done.returncode}: {done.stderr.strip()[-400:]}")
            times[label].append(seconds)
            print(f"| {r} | {label} | {seconds:.1f} | {before:.2f} | {os.getloadavg()[0]:.2f} |", flush=True)
    first = chosen[0][0]
    print(f"\n| contender | best s | {first} best / its best | numbers against {first} (last round) |")
    print("|---|---|---|---|")
    for label, _, _ in chosen:
        diff = _differences(
            out / f"{first}.{rounds}" / "evaluate.csv", out / f"{label}.{rounds}" / "evaluate.csv"
        )
        ratio = min(times[first]) / min(times[label])
        print(f"| {label} | {min(times[label]):.1f} | {ratio:.2f}x | {diff} |")
    print(f"\nresults in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("photos", help="write the timing photos as PNG files into a new folder")
    p.add_argument("folder", type=Path)
    p.add_argument("n", type=int, nargs="?", default=32)
    r = sub.add_parser("run", help="time camkit evaluate for each contender, interleaved")
    r.add_argument("folder", type=Path)
    r.add_argument("contenders", nargs="+", help="LABEL=SRC [OPTIONS] (quote it when it has options)")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument(
        "--out", type=Path, default=None, help="where the results go (default: a temporary folder)"
    )
    args = parser.parse_args()
    if args.command == "photos":
        write_photos(args.folder, args.n)
        return
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="bench-evaluate-cli-"))
    run(args.folder, args.contenders, args.rounds, out)


if __name__ == "__main__":
    main()
