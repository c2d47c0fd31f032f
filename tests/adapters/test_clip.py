"""Zero-shot CLIP models with text prompts: open_clip (``clip:``, a tiny config folder) and transformers CLIP /
SigLIP (``hf:``, tiny random configs saved with a byte-level tokenizer built here, offline). The logits are the
models' own image-text logits; Grad-CAM on a prompt equals the formula computed by hand and changes with the
prompt; the model comes back unchanged; the command line takes ``--prompt``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import camkit
from camkit.adapters import load_model
from camkit.adapters.clip import ZeroShotCLIP, from_open_clip
from camkit.errors import CamkitError
from testbed import assert_unchanged, snapshot

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "a photo of a dog", "a diagram"]
TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


@pytest.fixture(scope="module")
def oc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("openclip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    return folder


def _tokenizer() -> Any:
    """A byte-level CLIP tokenizer with no merges: every byte a token (built offline)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tok = _tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    text.update(num_attention_heads=2, max_position_embeddings=32)
    vision = dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    vision.update(num_attention_heads=2)
    out = {}
    for name, cfg_cls, model_cls in (
        ("clip", transformers.CLIPConfig, transformers.CLIPModel),
        ("siglip", transformers.SiglipConfig, transformers.SiglipModel),
    ):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model_cls(cfg_cls(text_config=text, vision_config=vision)).save_pretrained(folder)
        tok.save_pretrained(folder)
        transformers.CLIPImageProcessor(
            size={"height": 64, "width": 64}, do_center_crop=False
        ).save_pretrained(folder)
        out[name] = folder
    return out


def test_open_clip_logits_are_the_models_own(oc_dir: Path) -> None:
    torch.manual_seed(0)
    lm = load_model(f"clip:{oc_dir}", prompts=PROMPTS)
    assert isinstance(lm.model, ZeroShotCLIP) and lm.labels == PROMPTS
    assert lm.preprocess.size == (64, 64) and lm.preprocess.mean == (0.5, 0.5, 0.5)
    model = lm.model.model
    x = lm.preprocess(camkit.sample_image("chelsea"))
    with torch.no_grad():
        image, text, scale = model(x, open_clip.get_tokenizer(f"local-dir:{oc_dir}")(PROMPTS))
        assert torch.allclose(lm.model(x), scale * image @ text.T, atol=1e-4)


def _gradcam_by_hand(
    view: ZeroShotCLIP, layer: torch.nn.Module, x: torch.Tensor, prompt: int
) -> torch.Tensor:
    """Grad-CAM at a ViT block's output: drop the class token, weights = mean gradient per channel, ReLU."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    try:
        score = view(x)[0, prompt]
        (grad,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    acts, grads = store["a"][0, 1:].detach(), grad[0, 1:]  # [N, C], batch first
    side = int(acts.shape[0] ** 0.5)
    return torch.relu((grads.mean(0) * acts).sum(1)).reshape(side, side)


def test_open_clip_gradcam_on_a_prompt_is_the_formula_and_responds_to_it(oc_dir: Path) -> None:
    torch.manual_seed(0)
    lm = load_model(f"clip:{oc_dir}", prompts=PROMPTS)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    before = snapshot(lm.model.model)
    maps = {}
    for p, prompt in enumerate(PROMPTS):
        expl = camkit.explain(lm.model, x, "gradcam", targets=prompt, labels=lm.labels, relu=False)
        layer = expl.layers[0]
        assert layer == "model.visual.transformer.resblocks.0"  # the input of the last attention
        assert int(expl.classes[0]) == p
        ref = _gradcam_by_hand(lm.model, lm.model.get_submodule(layer), x, p)
        raw = torch.relu(expl.raw[layer][0])
        assert torch.corrcoef(torch.stack([raw.flatten(), ref.flatten()]))[0, 1] > 0.999
        maps[prompt] = raw
    assert_unchanged(before, lm.model.model)
    pair = torch.stack([maps[PROMPTS[0]].flatten(), maps[PROMPTS[2]].flatten()])
    assert torch.corrcoef(pair)[0, 1] < 0.99  # another prompt, another map


def test_similarity_to_a_prompt_made_of_a_region(oc_dir: Path) -> None:
    """Known answer: a prompt whose text embedding is the image embedding of a picture holding only a square at the
    top-left; in a picture holding that square and another at the bottom-right, Grad-CAM on that prompt puts more
    mass on the top-left square than Grad-CAM on the same picture's own embedding does."""
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{oc_dir}").eval()
    left = torch.zeros(1, 3, 64, 64)
    left[..., 0:16, 0:16] = 2.0
    both = left.clone()
    both[..., 48:64, 48:64] = -2.0
    with torch.no_grad():
        text = torch.cat([model.encode_image(left), model.encode_image(both)])
    view = ZeroShotCLIP(model, model.encode_image, text, ["left square", "both squares"], 1.0)
    results = [camkit.explain(view, both, "gradcam", targets=p).maps[0] for p in (0, 1)]
    share = [float(m[0:16, 0:16].sum() / (m[0:16, 0:16].sum() + m[48:64, 48:64].sum())) for m in results]
    assert share[0] > share[1]


def test_attention_and_eigencam_on_open_clip(oc_dir: Path) -> None:
    lm = load_model(f"clip:{oc_dir}", prompts=PROMPTS[:1])
    image = camkit.sample_image("chelsea")
    results = camkit.compare(lm.model, image, ["eigencam", "gradcam++", "rollout"], preprocess=lm.preprocess)
    for name, expl in results.items():
        assert expl.maps.shape[-2:] == (64, 64) and float(expl.maps.std()) > 0.05, name


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_transformers_clip_and_siglip_through_hf(hf_dirs: dict[str, Path], family: str) -> None:
    lm = load_model(f"hf:{hf_dirs[family]}", prompts=PROMPTS)
    assert isinstance(lm.model, ZeroShotCLIP) and lm.labels == PROMPTS
    model = lm.model.model
    x = lm.preprocess(camkit.sample_image("chelsea"))
    tok = _tokenizer()
    padding = {"padding": "max_length", "max_length": 32} if family == "siglip" else {"padding": True}
    ids = tok(PROMPTS, return_tensors="pt", **padding)
    args = {"input_ids": ids["input_ids"]} if family == "siglip" else dict(ids)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), model(pixel_values=x, **args).logits_per_image, atol=1e-4)
    before = snapshot(model)
    expl = camkit.explain(lm.model, x, "gradcam", targets="a photo of a dog", labels=lm.labels)
    assert_unchanged(before, model)
    assert int(expl.classes[0]) == 1 and float(expl.maps.std()) > 0.05


def test_prompts_are_required_and_checked(oc_dir: Path) -> None:
    with pytest.raises(CamkitError, match="needs text prompts"):
        load_model(f"clip:{oc_dir}")
    with pytest.raises(CamkitError, match="repeat"):
        load_model(f"clip:{oc_dir}", prompts=["a cat", "a cat"])
    with pytest.raises(CamkitError, match="needs a network"):
        load_model("clip:ViT-B-32", prompts=["a cat"])
    with pytest.raises(CamkitError, match="Closest"):
        load_model("clip:ViT-B-33", prompts=["a cat"])
    with pytest.raises(CamkitError, match="not a CLIP model"):
        load_model("resnet18", pretrained=False, prompts=["a cat"])
    with pytest.raises(CamkitError, match="one row per prompt"):
        from_open_clip(
            open_clip.create_model(f"local-dir:{oc_dir}"),
            lambda t: torch.zeros(1, 16, dtype=torch.long),
            ["a", "b"],
        )


def test_cli_explain_with_prompts(oc_dir: Path, tmp_path: Path) -> None:
    from camkit.cli import app

    out = tmp_path / "out"
    args = [
        "explain",
        "--model",
        f"clip:{oc_dir}",
        "--prompt",
        "a photo of a cat",
        "--prompt",
        "a photo of a dog",
    ]
    res = CliRunner().invoke(
        app, [*args, "--target", "a photo of a dog", "--methods", "gradcam", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    entries = json.loads((out / "summary.json").read_text())
    assert [e["label"] for e in entries] == ["a photo of a dog"] and entries[0]["class"] == 1
    res = CliRunner().invoke(app, ["explain", "--model", f"clip:{oc_dir}", "--out", str(out)])
    assert res.exit_code == 2 and "--prompt" in res.output


def test_served_clip_model_gets_the_prompts(oc_dir: Path) -> None:
    from camkit.app.server import AppConfig

    config = AppConfig(model=f"clip:{oc_dir}", prompts=("a cat", "a dog"), pretrained=False)
    assert config.spec(f"clip:{oc_dir}").load().labels == ["a cat", "a dog"]
    assert config.spec("resnet18").prompts == ()


def test_cli_evaluate_with_prompts(oc_dir: Path, tmp_path: Path) -> None:
    from camkit.cli import app

    photo = tmp_path / "cat.png"
    camkit.sample_image("chelsea").resize((64, 64)).save(photo)
    out = tmp_path / "eval"
    args = ["evaluate", str(photo), "--model", f"clip:{oc_dir}", "--prompt", "a cat", "--prompt", "a dog"]
    res = CliRunner().invoke(app, [*args, "--methods", "gradcam", "--steps", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "evaluate.json").is_file()
