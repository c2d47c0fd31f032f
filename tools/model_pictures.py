"""Regenerate the pictures of docs/models.md's YOLO and CLIP sections (docs/pictures/yolo_gradcam.png,
docs/pictures/clip_gradcam.png) with the `camkit explain` command, random weights, nothing downloaded.

    .venv/bin/python tools/model_pictures.py

ultralytics writes its settings into a temporary YOLO_CONFIG_DIR here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURES = ROOT / "docs" / "pictures"

COMMANDS = {
    "yolo_gradcam.png": [
        "--model", "yolo:yolov8n.yaml", "--input-size", "320", "--det-threshold", "0", "--methods", "gradcam",
    ],
    "clip_gradcam.png": [
        "--model", "clip:ViT-B-32", "--no-pretrained", "--prompt", "a photo of a cat", "--prompt",
        "a photo of a dog", "--target", "a photo of a cat", "--methods", "gradcam",
    ],
}  # fmt: skip


def main() -> int:
    PICTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, YOLO_CONFIG_DIR=str(Path(tmp) / "settings"), YOLO_OFFLINE="1")
        for name, args in COMMANDS.items():
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "camkit", "explain", "--sample", "chelsea", *args]
            cmd += ["--max-side", "320", "--out", str(out)]
            code = subprocess.call(cmd, cwd=ROOT, env=env)
            if code != 0:
                return code
            (picture,) = [p for p in out.glob("*.png") if "grid" not in p.name]
            shutil.copyfile(picture, PICTURES / name)
            print(f"wrote {PICTURES / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
