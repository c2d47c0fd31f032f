"""Draw docs/hf_tasks.png: camkit's maps for three transformers tasks loaded through ``hf:DIR``.

    .venv/bin/python tools/hf_figure.py

Tiny transformers models (a ViT classifier, a SegFormer, a DETR with a ResNet backbone) are built with random
weights from seed 0, written with ``save_pretrained`` into a temporary folder and loaded with
``camkit.load_model("hf:DIR")``, as a saved fine-tuned model would be; each explains the sample photo with no
layer and no target given (the automatic layer, the top class, the default segmentation class, the best
detection). With random weights the maps show the form of the output, not what a trained model looks at.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import camkit
from camkit.core.tasks import set_score_threshold
from camkit.viz import draw_boxes, grid

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "hf_tasks.png"
SIZE = 64
LABELS = {0: "cat", 1: "dog", 2: "bird"}


def _models() -> dict[str, object]:
    import transformers as t

    vit = dict(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64)  # fmt: skip
    backbone = t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=["stage4"])  # fmt: skip
    return {
        "ViT (classification)": t.ViTForImageClassification(t.ViTConfig(**vit, id2label=LABELS)),
        "SegFormer (segmentation)": t.SegformerForSemanticSegmentation(
            t.SegformerConfig(
                num_encoder_blocks=2,
                depths=[1, 1],
                sr_ratios=[2, 1],
                hidden_sizes=[16, 32],
                patch_sizes=[7, 3],
                strides=[4, 2],
                num_attention_heads=[1, 2],
                mlp_ratios=[2, 2],
                decoder_hidden_size=32,
                id2label=LABELS,
            )
        ),
        "DETR (detection)": t.DetrForObjectDetection(
            t.DetrConfig(
                use_timm_backbone=False,
                use_pretrained_backbone=False,
                backbone_config=backbone,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                num_queries=10,
                id2label=LABELS,
            )
        ),
    }


def main() -> int:
    import transformers

    torch.manual_seed(0)
    image = camkit.sample_image("chelsea")
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for title, model in _models().items():
            folder = Path(tmp) / title.split()[0]
            model.save_pretrained(folder)  # type: ignore[attr-defined]
            transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
            lm = camkit.load_model(f"hf:{folder}")
            if lm.task == "detection":
                set_score_threshold(lm.model, 0.0)
            res = camkit.compare(
                lm.model, image, ["gradcam", "layercam"], preprocess=lm.preprocess, labels=lm.labels
            )
            cells = {}
            for method, expl in res.items():
                picture = expl.overlay(0)
                chosen = expl.chosen[0] if expl.chosen else None
                if chosen is not None and chosen.box is not None:
                    sx, sy = image.width / SIZE, image.height / SIZE
                    x0, y0, x1, y1 = chosen.box
                    picture = draw_boxes(picture, [[x0 * sx, y0 * sy, x1 * sx, y1 * sy]])
                cells[method] = picture
            rows[f"{title}, auto layer {res['gradcam'].layers[0]}"] = cells
    picture = grid(
        rows, image=image, cell=160, title="hf:DIR, random weights (seed 0): the form of each task's maps"
    )
    picture.save(OUT)
    print(f"wrote {OUT} ({picture.width}x{picture.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
