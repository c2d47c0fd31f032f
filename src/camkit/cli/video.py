"""``camkit explain clip.mp4 --model r3d_18``: the clip path of ``camkit explain`` (video models).

For each clip and method: ``<clip>_<method>.gif`` (or ``.mp4``, ``--animation``), the overlays of every sampled
frame as an animation, and ``<clip>_<method>_frames.png``, the same overlays side by side; ``_topK`` before the
suffix for ``--target topK``. ``summary.json`` gets one entry per file, as for images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def explain_clips(paths: list[Path], job: ClipJob) -> None:
    """Explain every clip of ``paths`` with every method of ``job``; write the animations, frame strips and
    ``summary.json``. Raises ValueError (printed as ``error:``, exit 2) for a usage error."""
    from dataclasses import replace

    from camkit.adapters.video import (
        VIDEO_SUFFIXES,
        ClipPreprocess,
        load_clip,
        overlay_frames,
        save_animation,
    )
    from camkit.core.pipeline import compare
    from camkit.core.targets import TopK, parse_target
    from camkit.io.files import output_stems, prepare_out_dir, save_image
    from camkit.viz import hstack

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
    prepare_out_dir(job.out)
    previous_entries(job.out / "summary.json")  # refuse a foreign summary.json before any model work
    loaded = load_model(job.opts, input_size=job.input_size)
    if loaded.task != "video" or not isinstance(loaded.preprocess, ClipPreprocess):
        raise CamkitError(
            f"{loaded.name} is not a video model; clips need one of torchvision's video classifiers "
            "(--model r3d_18, mc3_18 or r2plus1d_18)"
        )
    preprocess = replace(loaded.preprocess, frames=job.frames)
    spec = parse_target(job.target)
    run_info = {
        **job.opts.to_dict(),
        **versions(),
        "options": {
            "methods": job.methods,
            "layers": job.layers,
            "target": job.target,
            "fusion": job.fusion,
            "cmap": job.cmap,
            "alpha": job.alpha,
            "max_side": job.max_side,
            "frames": job.frames,
            "animation": job.animation,
            "input_size": job.input_size,
        },
    }
    table = new_table(
        f"camkit explain · {loaded.name}", ("clip", "class", "prob", "method", "layers", "file")
    )
    tag = job.opts.file_tag()
    entries: list[dict[str, object]] = []
    for path, stem in zip(paths, output_stems(paths, suffix_room=50), strict=True):
        clip = load_clip(path, preprocess)
        results = compare(
            loaded.model,
            clip.x,
            methods=job.methods,
            layers=job.layers,
            targets=spec,
            labels=loaded.labels,
            fusion=job.fusion,
        )
        fps = clip.fps or 8.0
        for name, expl in results.items():
            n_targets = expl.maps.shape[1] if expl.maps.dim() == 5 else 1
            for t in range(n_targets):
                maps = expl.maps[0, t] if expl.maps.dim() == 5 else expl.maps[0]
                pictures = overlay_frames(
                    clip.frames, maps, cmap=job.cmap, alpha=job.alpha, max_side=job.max_side
                )
                suffix = f"_top{t + 1}" if isinstance(spec, TopK) else ""
                anim = save_animation(pictures, job.out / f"{stem}{tag}_{name}{suffix}.{job.animation}", fps)
                strip = job.out / f"{stem}{tag}_{name}{suffix}_frames.png"
                save_image(hstack(pictures, height=min(pictures[0].height, 224)), strip)
                cls = expl.classes[0, t] if expl.classes is not None and expl.classes.dim() == 2 else None
                if expl.classes is not None and expl.classes.dim() == 1:
                    cls = expl.classes[0]
                prob = None
                if expl.probs is not None:
                    prob = float(expl.probs[0, t] if expl.probs.dim() == 2 else expl.probs[0])
                label = None
                if expl.labels:
                    first = expl.labels[0]
                    label = first[t] if isinstance(first, list) else first
                for file in (anim, strip):
                    entry = {
                        "image": path.name,
                        "class": None if cls is None else int(cls),
                        "label": label,
                        "prob": prob,
                        "method": name,
                        "layers": expl.layers,
                        "frames": len(clip.frames),
                        "file": str(file),
                        "source": str(path),
                        **run_info,
                    }
                    entries.append(entry)
                    table.add_row(
                        path.name,
                        "" if cls is None else f"{int(cls)} {label or ''}".strip(),
                        "" if prob is None else f"{prob:.3f}",
                        name,
                        ",".join(expl.layers),
                        file.name,
                    )
    update_entries(job.out / "summary.json", entries)
    console.print(table)
    console.print(f"written to {job.out}/")
