"""A ground-truth test bed: synthetic images whose object position is known by construction, and a small CNN
that learns them on CPU in seconds.

Each 64 x 64 image is clutter (smooth colour noise, pixel noise and a few small random rectangles) with one object
pasted at a random position: a disc, a ring, a plus sign or a checkered square (the 4 classes), 16 to 26 pixels
wide, in a random bright colour. The box of the object's pixels is the ground truth. Nothing is stored in the
repository: the data are generated from a seed, the model is trained once per test session (the fixtures in
``conftest.py``) and its weights are also kept in pytest's cache folder when the cache plugin is on.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

T = TypeVar("T")

SIZE = 64
CLASSES = ("disc", "ring", "plus", "checker")


@dataclass
class Batch:
    images: Tensor  # [N, 3, 64, 64] in [0, 1]
    labels: Tensor  # [N]
    boxes: Tensor  # [N, 4] x0, y0, x1, y1 (half-open) in pixels


def _shape_masks(labels: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Masks [N, S, S] on local coordinates u, v in [-1, 1]."""
    r = torch.sqrt(u**2 + v**2)
    disc = r <= 1.0
    ring = (r <= 1.0) & (r >= 0.55)
    plus = ((u.abs() <= 0.3) | (v.abs() <= 0.3)) & (u.abs() <= 1) & (v.abs() <= 1)
    checker = (torch.floor((u + 1) * 2).long() + torch.floor((v + 1) * 2).long()) % 2 == 0
    checker = checker & (u.abs() <= 1) & (v.abs() <= 1)
    masks = torch.stack([disc, ring, plus, checker], dim=1)  # [N, 4, S, S]
    return masks[torch.arange(labels.shape[0]), labels]


def make_batch(n: int, generator: torch.Generator) -> Batch:
    g = generator
    # clutter: smooth colour noise + pixel noise + 4 small rectangles of random colours
    low = torch.rand(n, 3, 6, 6, generator=g) * 0.5
    img = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    img = img + 0.06 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for _ in range(4):
        w = torch.randint(2, 7, (n, 1, 1), generator=g)
        h = torch.randint(2, 7, (n, 1, 1), generator=g)
        x0 = torch.randint(0, SIZE - 6, (n, 1, 1), generator=g)
        y0 = torch.randint(0, SIZE - 6, (n, 1, 1), generator=g)
        rect = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        color = torch.rand(n, 3, 1, 1, generator=g) * 0.9 + 0.1
        img = torch.where(rect[:, None], color, img)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    size = torch.randint(16, 27, (n,), generator=g)
    ox = (torch.rand(n, generator=g) * (SIZE - size)).long()
    oy = (torch.rand(n, generator=g) * (SIZE - size)).long()
    # local coordinates of every image pixel relative to the object square, in [-1, 1] inside it
    half = size.float().view(n, 1, 1) / 2
    u = (xx[None] + 0.5 - (ox.view(n, 1, 1) + half)) / half
    v = (yy[None] + 0.5 - (oy.view(n, 1, 1) + half)) / half
    mask = _shape_masks(labels, u, v)
    hue = torch.rand(n, 3, 1, 1, generator=g)
    color = 0.55 + 0.45 * hue / hue.amax(dim=1, keepdim=True)
    img = torch.where(mask[:, None], color, img).clamp(0, 1)
    ys = mask.any(dim=2)
    xs = mask.any(dim=1)
    ar = torch.arange(SIZE)
    boxes = torch.stack(
        [
            torch.where(xs, ar, SIZE).amin(dim=1),
            torch.where(ys, ar, SIZE).amin(dim=1),
            torch.where(xs, ar, -1).amax(dim=1) + 1,
            torch.where(ys, ar, -1).amax(dim=1) + 1,
        ],
        dim=1,
    )
    return Batch(images=img, labels=labels, boxes=boxes)


def normalize(images: Tensor) -> Tensor:
    return (images - 0.5) / 0.25


class SmallCNN(nn.Module):
    """conv-BN-ReLU x 4 (64 -> 16 px), GAP, Linear: a CAM-compatible classifier; the last block is ``features.3``."""

    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 32, 2), block(32, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def train(steps: int = 150, batch: int = 32, seed: int = 0) -> SmallCNN:
    """Train on fresh batches (no epoch, no overfitting); one thread: small ops are slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(steps, batch, seed)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, batch: int, seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        b = make_batch(batch, g)
        loss = F.cross_entropy(model(normalize(b.images)), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


_TRAINED: dict[str, dict[str, Tensor]] = {}  # source hash -> state dict, for the whole process


def trained_model(cache_dir: Path | None = None) -> SmallCNN:
    """A fresh copy of the trained test-bed model: trained on the first call in this process, or loaded from
    ``cache_dir`` when it holds weights cached by this version of this file."""
    key = source_hash()
    path = cache_dir / f"smallcnn-{key}.pt" if cache_dir is not None else None
    if key not in _TRAINED:
        if path is not None and path.exists():
            _TRAINED[key] = torch.load(path, map_location="cpu", weights_only=True)
        else:
            _TRAINED[key] = train().state_dict()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(_TRAINED[key], path)
    model = SmallCNN()
    model.load_state_dict(_TRAINED[key])
    return model.eval()


def test_set(n: int = 256, seed: int = 12345) -> Batch:
    return make_batch(n, torch.Generator().manual_seed(seed))


if __name__ == "__main__":
    t0 = time.perf_counter()
    m = train()
    t1 = time.perf_counter()
    b = test_set()
    with torch.no_grad():
        acc = (m(normalize(b.images)).argmax(1) == b.labels).float().mean()
    print(f"trained in {t1 - t0:.1f} s, test accuracy {float(acc):.3f}")


def load_tool(name: str) -> Any:
    """A script of the repository's ``tools/`` folder, imported as a module (registered in ``sys.modules``)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class GapHead(nn.Module):
    """The input *is* the activation A: feat (identity) -> GAP -> Linear. dS/dA = W[c] / (h*w) exactly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            if bias is not None:
                self.fc.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.feat(x).mean(dim=(2, 3)))


class TinyGapNet(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU(inplace) -> GAP -> Linear: a CAM-compatible head."""

    def __init__(self, k: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, k, 3, padding=1, stride=2),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(k, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class TinyNonlinearHead(nn.Module):
    """Features followed by a non-linear head, so dS/dA varies over space (distinguishes the methods)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Conv2d(6, 4, 1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.features(x))
        h = nn.functional.adaptive_avg_pool2d(h, 4) ** 2
        return self.fc(h.flatten(1))


@dataclass
class Snapshot:
    """Everything about a model that camkit must leave as it found it."""

    state: dict[str, torch.Tensor]
    hooks: dict[str, tuple[int, ...]]  # module name -> number of hooks of each kind
    requires_grad: dict[str, bool]
    grad: dict[str, torch.Tensor | None]
    training: dict[str, bool]
    grad_mode: bool


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_state_dict_hooks",
)


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: v.clone() for k, v in model.state_dict().items()},
        hooks={n: tuple(len(getattr(m, attr)) for attr in _HOOK_DICTS) for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        grad={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        training={n: m.training for n, m in model.named_modules()},
        grad_mode=torch.is_grad_enabled(),
    )


def assert_unchanged(before: Snapshot, model: nn.Module) -> None:
    after = snapshot(model)
    assert after.hooks == before.hooks, "hooks left on the model"
    assert after.requires_grad == before.requires_grad
    assert after.training == before.training
    assert after.grad_mode == before.grad_mode
    for k, v in before.state.items():
        assert torch.equal(after.state[k], v), f"state {k} changed"
    for k, g in before.grad.items():
        g2 = after.grad[k]
        assert (g is None and g2 is None) or (g is not None and g2 is not None and torch.equal(g, g2)), k


# ---------------------------------------------------------------------- tiny transformers models (random weights)

HF_LABELS = {0: "cat", 1: "dog", 2: "bird"}
HF_MEAN, HF_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _hf_vit(size: int) -> dict[str, Any]:
    return dict(
        image_size=size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


def _hf_classifier_configs(t: Any, size: int) -> dict[str, Any]:
    vit = _hf_vit(size)
    swin = dict(image_size=size, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    return {
        "vit": lambda: t.ViTConfig(**vit),
        "deit": lambda: t.DeiTConfig(**vit),
        "deit-distilled": lambda: t.DeiTConfig(**vit),
        "beit": lambda: t.BeitConfig(**vit),
        "dinov2": lambda: t.Dinov2Config(**vit),
        "dinov2-registers": lambda: t.Dinov2WithRegistersConfig(**vit, num_register_tokens=2),
        "swin": lambda: t.SwinConfig(**swin),
        "swinv2": lambda: t.Swinv2Config(**swin),
        "convnext": lambda: t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
        "convnextv2": lambda: t.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
        "resnet": lambda: t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        ),
        "regnet": lambda: t.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8
        ),
        "efficientnet": lambda: t.EfficientNetConfig(
            image_size=size, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320
        ),
        "mobilevit": lambda: t.MobileViTConfig(
            image_size=size, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 16, 16, 24, 32]
        ),
        "levit": lambda: t.LevitConfig(
            image_size=size,
            hidden_sizes=[16, 32, 48],
            num_attention_heads=[1, 2, 3],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
        ),
        "pvt": lambda: t.PvtConfig(
            image_size=size,
            hidden_sizes=[8, 16],
            num_encoder_blocks=2,
            depths=[1, 1],
            sequence_reduction_ratios=[2, 1],
            num_attention_heads=[1, 2],
            patch_sizes=[4, 2],
            strides=[4, 2],
            mlp_ratios=[2, 2],
        ),
    }


def _hf_task_configs(t: Any, size: int) -> dict[str, Any]:
    return {
        "segformer": lambda: t.SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=32,
        ),
        "upernet": lambda: t.UperNetConfig(
            backbone_config=t.ConvNextConfig(
                hidden_sizes=[8, 16, 32, 64],
                depths=[1, 1, 1, 1],
                out_features=["stage1", "stage2", "stage3", "stage4"],
            ),
            hidden_size=16,
            use_auxiliary_head=False,
        ),
        "detr": lambda: t.DetrConfig(
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            backbone_config=t.ResNetConfig(
                embedding_size=8,
                hidden_sizes=[8, 16, 16, 32],
                depths=[1, 1, 1, 1],
                layer_type="basic",
                out_features=["stage4"],
            ),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_queries=10,
        ),
        "yolos": lambda: t.YolosConfig(
            **{**_hf_vit(size), "image_size": [size, size]}, num_detection_tokens=5
        ),
    }


HF_CLASSIFIERS = (
    "vit",
    "deit",
    "deit-distilled",
    "beit",
    "dinov2",
    "dinov2-registers",
    "swin",
    "swinv2",
    "convnext",
    "convnextv2",
    "resnet",
    "regnet",
    "efficientnet",
    "mobilevit",
    "levit",
    "pvt",
)
HF_SEGMENTERS = ("segformer", "upernet")
HF_DETECTORS = ("detr", "yolos")


def hf_model(family: str, size: int = 32, seed: int = 0) -> nn.Module:
    """A tiny transformers model with random weights (hidden size 32 or less, 1-2 blocks per stage) and three
    classes (:data:`HF_LABELS`): a classifier of :data:`HF_CLASSIFIERS`, a semantic segmentation model of
    :data:`HF_SEGMENTERS` or a detector of :data:`HF_DETECTORS`, for ``size`` x ``size`` images."""
    import transformers as t

    config = {**_hf_classifier_configs(t, size), **_hf_task_configs(t, size)}[family]()
    config.id2label = dict(HF_LABELS)
    config.label2id = {v: k for k, v in HF_LABELS.items()}
    torch.manual_seed(seed)
    if family in HF_SEGMENTERS:
        return _unit_norms(t.AutoModelForSemanticSegmentation.from_config(config)).eval()
    if family in HF_DETECTORS:
        return t.AutoModelForObjectDetection.from_config(config).eval()
    special = {
        "deit": t.DeiTForImageClassification,
        "deit-distilled": t.DeiTForImageClassificationWithTeacher,
        "levit": t.LevitForImageClassification,
    }
    model = (special[family] if family in special else t.AutoModelForImageClassification.from_config)(config)
    return _unit_norms(model).eval()


def _unit_norms(model: nn.Module) -> nn.Module:
    """Convolutions, linear layers and batch norms initialised as PyTorch does: transformers initialises them with
    std 0.02 (batch norm scales too), and through EfficientNet's or MobileViT's dozens of layers the features of a
    random model shrink to nearly 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                m.reset_parameters()
    return model


def save_hf(family: str, folder: Path, size: int = 32) -> Path:
    """:func:`hf_model` saved with ``save_pretrained`` into ``folder``, with an image processor of that size and
    the mean and std :data:`HF_MEAN`, :data:`HF_STD`; returns ``folder``."""
    import transformers

    hf_model(family, size).save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=list(HF_MEAN), image_std=list(HF_STD)
    ).save_pretrained(folder)
    return folder


def two_conv_net(channels: int, seed: int) -> nn.Sequential:
    """A seeded two-convolution classifier (3 classes) in eval mode: ``c1`` (4 channels, full size), ``c2``
    (``channels``, half size), then global average pooling and ``fc``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            c1=nn.Conv2d(3, 4, 3, padding=1),
            r1=nn.ReLU(),
            c2=nn.Conv2d(4, channels, 3, padding=1, stride=2),
            r2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(channels, 3),
        )
    ).eval()


def images_through(model: nn.Module, fn: Callable[[], object]) -> int:
    """How many images the model's forward saw while ``fn()`` ran."""
    seen = [0]
    handle = model.register_forward_pre_hook(lambda _m, args: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return seen[0]


def in_threads(fn: Callable[[], T], threads: int, calls: int) -> list[T]:
    """``fn``'s results when ``threads`` threads each call it ``calls`` times at once; the first error of any
    thread is raised after all have ended."""
    out: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(calls):
                out.append(fn())
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return out


def randomize_norms(model: nn.Module, seed: int = 0, bias: bool = True) -> nn.Module:
    """Non-trivial BatchNorm statistics and scales (and shifts, with ``bias``), so that folding a BatchNorm into
    its convolution changes the weights; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                if bias:
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()
