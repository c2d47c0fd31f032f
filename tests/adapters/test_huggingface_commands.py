"""``hf:DIR`` through every command: a tiny transformers model saved with ``save_pretrained`` into a temporary
folder, offline (``HF_HUB_OFFLINE=1``), through ``camkit explain``, ``run``, ``report``, ``evaluate`` and the web
app of ``camkit serve``; segmentation and detection models through ``explain`` and ``report``, and refused in one
line by ``run`` and ``evaluate``, whose metrics follow a class score."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

import camkit
from camkit.cli import app as cli
from testbed import save_hf

pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hf-commands")
    for name in ("vit", "segformer", "detr"):
        save_hf(name, base / name)
    rng = np.random.RandomState(0)
    (base / "images").mkdir()
    for i in range(2):
        Image.fromarray((rng.rand(48, 40, 3) * 255).astype("uint8")).save(base / "images" / f"im{i}.png")
    return base


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads the variable when imported: its constant too, so no request leaves the machine
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def invoke(*args: object) -> Result:
    return runner.invoke(cli, [str(a) for a in args])


def ok(res: Result) -> Result:
    assert res.exit_code == 0, res.output
    return res


def test_run_report_and_evaluate_a_classifier_folder(root: Path, tmp_path: Path) -> None:
    from camkit.run import open_store

    model = f"hf:{root / 'vit'}"
    store = tmp_path / "store"
    ok(invoke("run", root / "images", "--out", store, "--model", model, "--methods", "gradcam,rollout",
              "--metrics", "deletion", "--steps", "3", "--workers", "0", "--no-progress"))  # fmt: skip
    st = open_store(store)
    assert st.complete and sorted(st.methods) == ["gradcam", "rollout"]
    report = tmp_path / "report.html"
    ok(invoke("report", store, "-o", report, "--image-root", root / "images"))
    assert report.stat().st_size > 0 and "rollout" in report.read_text()
    direct = tmp_path / "direct.html"
    ok(invoke("report", root / "images", "--model", model, "--methods", "gradcam", "-o", direct))
    assert "dog" in direct.read_text() or "cat" in direct.read_text() or "bird" in direct.read_text()
    res = ok(invoke("evaluate", root / "images", "--model", model, "-m", "gradcam", "--metrics", "deletion",
                    "--steps", "3", "--format", "json", "--out", tmp_path / "ev"))  # fmt: skip
    data = json.loads((tmp_path / "ev" / "evaluate.json").read_text())
    assert res.exit_code == 0 and np.isfinite(data["summary"]["gradcam"]["deletion"])


def test_segmentation_and_detection_folders(root: Path, tmp_path: Path) -> None:
    photo = root / "images" / "im0.png"
    seg = f"hf:{root / 'segformer'}"
    out = tmp_path / "seg"
    ok(invoke("explain", photo, "--model", seg, "--out", out))
    s = json.loads((out / "summary.json").read_text())[0]
    assert (
        s["task"] == "segmentation"
        and s["region"] in ("mask", "image")
        and s["label"] in ("cat", "dog", "bird")
    )
    ok(invoke("report", photo, "--model", seg, "-o", tmp_path / "seg.html"))
    det = f"hf:{root / 'detr'}"
    out = tmp_path / "det"
    ok(invoke("explain", photo, "--model", det, "--det-threshold", "0", "--out", out))
    s = json.loads((out / "summary.json").read_text())[0]
    assert (s["task"], s["region"]) == ("detection", "box") and len(s["box"]) == 4
    for command in (["run", root / "images", "--out", tmp_path / "st", "--workers", "0", "--no-progress"],
                    ["evaluate", root / "images", "--out", tmp_path / "ev"]):  # fmt: skip
        res = invoke(*command, "--model", det)
        assert res.exit_code == 2 and "classifiers" in res.output and "Traceback" not in res.output


def test_a_hub_id_without_network_fails_in_one_line(root: Path) -> None:
    res = invoke("explain", root / "images" / "im0.png", "--model", "hf:camkit-test/no-such-model")
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "network" in errors[0]


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from camkit.app import AppConfig, create_app

    model = f"hf:{root / 'vit'}"
    app = create_app(AppConfig(model=model, models=(model,), workers=1, queue=2))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def test_the_app_explains_a_folder_model(root: Path, client: Any) -> None:
    model = f"hf:{root / 'vit'}"
    layers = client.get("/api/layers", params={"model": model})
    assert layers.status_code == 200 and layers.json()["auto"] == "model.vit.layers.1.layernorm_before"
    png = (root / "images" / "im0.png").read_bytes()
    for method in ("gradcam", "rollout"):
        res = client.post("/api/explain", data={"model": model, "method": method},
                          files={"file": ("im0.png", png, "image/png")})  # fmt: skip
        assert res.status_code == 200, res.text
        ans = res.json()
        assert ans["label"] in ("cat", "dog", "bird") and ans["size"] == [40, 48]
        arr = np.frombuffer(base64.b64decode(ans["map"]), dtype="<f4").reshape(ans["map_shape"])
        lm = camkit.load_model(model)
        expl = camkit.explain(lm.model, [Image.open(root / "images" / "im0.png").convert("RGB")], method,
                              preprocess=lm.preprocess)  # fmt: skip
        np.testing.assert_allclose(arr, expl.maps[0].numpy(), rtol=1e-4, atol=1e-5)


def test_layers_shows_the_views_own_auto_layer(tmp_path: Path) -> None:
    # MobileViT's view names its automatic layer: `camkit layers` (and the app) show that one
    save_hf("mobilevit", tmp_path / "mobilevit", size=64)
    res = ok(invoke("layers", f"hf:{tmp_path / 'mobilevit'}"))
    assert "auto: model.mobilevit.conv_1x1_exp" in res.output
