"""benchmarks/bench_devset.py stats: the paired tables against Grad-CAM from evaluate.json files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _bench() -> Any:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_devset.py"
    spec = importlib.util.spec_from_file_location("bench_devset", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_devset"] = module
    spec.loader.exec_module(module)
    return module


def _record(model: str, methods: dict[str, float], n: int = 30) -> dict[str, object]:
    """An evaluate.json: method -> insertion shift over Grad-CAM's, IoU curves shifted alike."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.5, n)
    curves = rng.uniform(0, 1, (n, 100))
    rows, iou = [], {}
    for method, shift in methods.items():
        noise = rng.normal(0, 0.01, n) if shift else np.zeros(n)
        for i in range(n):
            rows.append({"image": f"p{i}.jpg", "method": method, "insertion": base[i] + shift + noise[i]})
        iou[method] = {f"p{i}.jpg": list(np.clip(curves[i] + 10 * shift, 0, 1)) for i in range(n)}
    return {"run": {"model": model}, "rows": rows, "iou_curves": iou}


def test_stats_tables_verdicts_and_docs_block(tmp_path: Path) -> None:
    bench = _bench()
    files = []
    for model in ("m0", "m1"):
        p = tmp_path / model / "evaluate.json"
        p.parent.mkdir()
        p.write_text(json.dumps(_record(model, {"gradcam": 0.0, "good": 0.05, "bad": -0.05})))
        files.append(p)
    photos = bench.load_photos(files)
    assert set(photos) == {"m0", "m1"} and len(photos["m0"]["maxboxacc"]["good"]) == 30
    text, signs = bench.stats_tables(photos)
    assert "**MaxBoxAccV2** (photos: m0 30, m1 30)" in text
    good = [line for line in text.splitlines() if line.startswith("| good |")]
    assert len(good) == 2 and all(line.count("**better**") == 2 for line in good)  # MaxBoxAccV2, insertion
    assert "(+0.050 [" in good[1]  # insertion: the shift
    assert signs["good"]["insertion"] == [1, 1] and signs["bad"]["insertion"] == [-1, -1]
    assert signs["good"]["maxboxacc"] == [1, 1]
    verdict = bench.stats_verdict(signs, 2)
    assert any(
        v.startswith("- `good`")
        and "2 of 2 models): better than Grad-CAM on every model in: maxboxacc, insertion;" in v
        for v in verdict
    )
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{bench.START}\nold\n{bench.END}\nafter\n")
    bench.write_block(doc, "NEW")
    assert doc.read_text() == f"before\n{bench.START}\n\nNEW\n\n{bench.END}\nafter\n"


def test_a_method_measured_on_fewer_photos_says_on_how_many(tmp_path: Path) -> None:
    bench = _bench()
    full = tmp_path / "full.json"
    full.write_text(json.dumps(_record("m0", {"gradcam": 0.0}, n=30)))
    part = _record("m0", {"gradcam": 0.0, "some": 0.05}, n=30)
    part["rows"] = [r for r in part["rows"] if r["method"] == "some" and int(r["image"][1:-4]) < 12]
    part["iou_curves"] = {"some": {k: v for k, v in part["iou_curves"]["some"].items() if int(k[1:-4]) < 12}}
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps(part))
    text, _ = bench.stats_tables(bench.load_photos([full, sub]))
    rows = [line for line in text.splitlines() if line.startswith("| some |")]
    assert len(rows) == 2 and all(line.endswith(", on 12 photos |") for line in rows)
    assert "(photos: m0 30)" in text  # Grad-CAM's count heads the table
