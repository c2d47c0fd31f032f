"""``camkit explain clip.mp4 --model r3d_18``: the clip path of ``camkit explain`` (video models).

For each clip and method: ``<clip>_<method>.gif`` (or ``.mp4``, ``--animation``), the overlays of every sampled
frame as an animation, and ``<clip>_<method>_frames.png``, the same overlays side by side; ``_topK`` before the
suffix for ``--target topK``. ``summary.json`` gets one entry per file, as for images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from camkit.cli.common import (
    ModelOptions,
    console,
    load_model,
    new_table,
    previous_entries,
    update_entries,
    versions,
)
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from camkit.adapters import LoadedModel
    from camkit.adapters.video import Clip, ClipPreprocess
    from camkit.core.explanation import Explanation

__all__ = ["ClipJob", "explain_clips"]


@dataclass(frozen=True)
class ClipJob:
    """The options of a clip run."""

    opts: ModelOptions
    methods: list[str]
    layers: str
    target: str | None
    out: Path
    cmap: str
    alpha: float
    fusion: str | None
    max_side: int | None
    input_size: int | None
    frames: int
    animation: str

    def summary_options(self) -> dict[str, object]:
        """The ``options`` object of each summary.json entry."""
        names = (
            "layers",
            "target",
            "fusion",
            "cmap",
            "alpha",
            "max_side",
            "frames",
            "animation",
            "input_size",
        )
        return {"methods": self.methods, **{n: getattr(self, n) for n in names}}


def explain_clips(paths: list[Path], job: ClipJob) -> None:
    """Explain every clip of ``paths`` with every method of ``job``; write the animations, frame strips and
    ``summary.json``. Raises :class:`~camkit.errors.CamkitError` (printed as ``error:``, exit 2) for a usage
    error."""
    from camkit.io.files import output_stems, prepare_out_dir

    _check_clips(paths, job)
    prepare_out_dir(job.out)
    previous_entries(job.out / "summary.json")  # refuse a foreign summary.json before any model work
    loaded, preprocess = _video_model(job)
    run_info = {**job.opts.to_dict(), **versions(), "options": job.summary_options()}
    table = new_table(
        f"camkit explain · {loaded.name}", ("clip", "class", "prob", "method", "layers", "file")
    )
    entries: list[dict[str, object]] = []
    for path, stem in zip(paths, output_stems(paths, suffix_room=50), strict=True):
        for row in _explain_clip(job, loaded, preprocess, path, f"{stem}{job.opts.file_tag()}"):
            entries.append({**row.to_dict(), "source": str(path), **run_info})
            table.add_row(*row.cells())
    update_entries(job.out / "summary.json", entries)
    console.print(table)
    console.print(f"written to {job.out}/")


def _check_clips(paths: list[Path], job: ClipJob) -> None:
    """The clip options and files, checked before the model is loaded."""
    from camkit.adapters.video import VIDEO_SUFFIXES

    if job.animation not in ("gif", "mp4"):
        raise CamkitError(f"--animation must be gif or mp4, got {job.animation!r}")
    if job.frames < 0:
        raise CamkitError(f"--frames must be 0 (all) or more, got {job.frames}")
    if not paths:
        raise CamkitError("a video model needs clip files: camkit explain clip.mp4 --model r3d_18")
    for p in paths:
        if not p.is_file():
            raise CamkitError(f"clip not found: {str(p)!r} (folders of clips are not read; name the files)")
        if p.suffix.lower() not in VIDEO_SUFFIXES:
            raise CamkitError(
                f"{str(p)!r} is not a clip ({', '.join(sorted(VIDEO_SUFFIXES))}); a video model explains clips"
            )


def _video_model(job: ClipJob) -> tuple[LoadedModel, ClipPreprocess]:
    """The video model of ``job`` and its clip preprocessing with ``--frames``."""
    from camkit.adapters.video import ClipPreprocess

    loaded = load_model(job.opts, input_size=job.input_size)
    if loaded.task != "video" or not isinstance(loaded.preprocess, ClipPreprocess):
        raise CamkitError(
            f"{loaded.name} is not a video model; clips need one of torchvision's video classifiers "
            "(--model r3d_18, mc3_18 or r2plus1d_18)"
        )
    return loaded, replace(loaded.preprocess, frames=job.frames)


@dataclass(frozen=True)
class ClipRow:
    """One file written for a clip: a row of the table and an entry of summary.json."""

    clip: str
    cls: int | None
    label: str | None
    prob: float | None
    method: str
    layers: list[str]
    frames: int
    file: Path

    def to_dict(self) -> dict[str, object]:
        """The summary.json fields (key ``image`` for the clip's name, ``class`` for :attr:`cls`)."""
        return {"image": self.clip, "class": self.cls, "label": self.label, "prob": self.prob,
                "method": self.method, "layers": self.layers, "frames": self.frames, "file": str(self.file)}  # fmt: skip

    def cells(self) -> tuple[str, ...]:
        """The table row."""
        what = "" if self.cls is None else f"{self.cls} {self.label or ''}".strip()
        prob = "" if self.prob is None else f"{self.prob:.3f}"
        return (self.clip, what, prob, self.method, ",".join(self.layers), self.file.name)


def _explain_clip(
    job: ClipJob, loaded: LoadedModel, preprocess: ClipPreprocess, path: Path, stem: str
) -> list[ClipRow]:
    """Every method on one clip: its animations and frame strips written, one row per file."""
    from camkit.adapters.video import load_clip
    from camkit.core.pipeline import compare
    from camkit.core.targets import TopK, parse_target

    clip = load_clip(path, preprocess)
    spec = parse_target(job.target)
    results = compare(
        loaded.model, clip.x, methods=job.methods, layers=job.layers, targets=spec, labels=loaded.labels,
        fusion=job.fusion,
    )  # fmt: skip
    rows: list[ClipRow] = []
    for name, expl in results.items():
        n_targets = expl.maps.shape[1] if expl.maps.dim() == 5 else 1
        for t in range(n_targets):
            suffix = f"_top{t + 1}" if isinstance(spec, TopK) else ""
            files = _write_clip_target(job, clip, expl, t, f"{stem}_{name}{suffix}")
            cls, label, prob = _of_target(expl, t)
            rows += [
                ClipRow(path.name, cls, label, prob, name, expl.layers, len(clip.frames), f) for f in files
            ]
    return rows


def _write_clip_target(job: ClipJob, clip: Clip, expl: Explanation, t: int, name: str) -> tuple[Path, Path]:
    """The animation and the frame strip of target ``t``: ``<name>.<gif|mp4>`` and ``<name>_frames.png``."""
    from camkit.adapters.video import overlay_frames, save_animation
    from camkit.io.files import save_image
    from camkit.viz import hstack

    maps = expl.maps[0, t] if expl.maps.dim() == 5 else expl.maps[0]
    pictures = overlay_frames(clip.frames, maps, cmap=job.cmap, alpha=job.alpha, max_side=job.max_side)
    anim = save_animation(pictures, job.out / f"{name}.{job.animation}", clip.fps or 8.0)
    strip = job.out / f"{name}_frames.png"
    save_image(hstack(pictures, height=min(pictures[0].height, 224)), strip)
    return anim, strip


def _of_target(expl: Explanation, t: int) -> tuple[int | None, str | None, float | None]:
    """The class, label and probability of target ``t`` of the first clip."""
    cls = None
    if expl.classes is not None:
        cls = int(expl.classes[0, t] if expl.classes.dim() == 2 else expl.classes[0])
    prob = None
    if expl.probs is not None:
        prob = float(expl.probs[0, t] if expl.probs.dim() == 2 else expl.probs[0])
    label = None
    if expl.labels:
        first = expl.labels[0]
        label = first[t] if isinstance(first, list) else first
    return cls, label, prob
