"""What the ``camkit`` commands share: consoles, options, the ``error:`` exit, progress bars, inputs, models.

* Model options (:class:`ModelOptions`, that is :class:`camkit.adapters.ModelSpec`, the ``*Option`` aliases,
  :func:`load_model`): every command that loads a
  model takes ``--model``, ``--weights``, ``--pretrained/--no-pretrained``, ``--seed``, ``--threads`` and
  ``--device`` with the same meaning.
* Inputs (:func:`collect_inputs`, :func:`read_input`): files and folders (searched recursively for image files,
  sorted, hidden files skipped), read one at a time under ``--max-pixels``.
* Progress (:class:`RunProgress`, from :mod:`camkit.cli.progress`, the one progress helper): one bar on stderr
  per command, over images and, for perturbation methods, over forward passes; off when stderr is not a terminal
  unless ``--progress`` forces it.
* Text (:mod:`camkit.cli.console`): :data:`console` and :data:`err_console` never read Rich markup or emoji codes,
  and progress columns show their descriptions as plain text: a file name, label or message holding ``[bold]``,
  ``[/x]`` or ``:smile:`` is printed exactly as it is. Styles are applied with :class:`rich.text.Text`, never with
  markup in a string.

Heavy imports (torch, the library) stay inside the functions so that ``camkit --help`` stays fast.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.table import Table
from rich.text import Text

from camkit.adapters.spec import ModelSpec
from camkit.cli.console import console, err_console
from camkit.cli.progress import RunProgress, run_progress
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from PIL import Image

    from camkit.adapters import LoadedModel
    from camkit.io.annotations import Annotation

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SAMPLE_NAMES",
    "USER_ERRORS",
    "AnnotationsOption",
    "DeviceOption",
    "ImagesArgument",
    "Input",
    "LayersOption",
    "MaxPixelsOption",
    "ModelOption",
    "ModelOptions",
    "PretrainedOption",
    "ProgressOption",
    "PromptOption",
    "RunProgress",
    "SampleOption",
    "SeedOption",
    "ThreadsOption",
    "WeightsOption",
    "annotated_targets",
    "collect_inputs",
    "console",
    "err_console",
    "error_line",
    "fail",
    "file_part",
    "given_options",
    "join_methods",
    "load_model",
    "load_pictures",
    "max_pixels_limit",
    "merge_entries",
    "model_option",
    "new_table",
    "note_line",
    "os_error_message",
    "out_option",
    "previous_entries",
    "read_annotated",
    "read_input",
    "read_or_skip",
    "refuse_for_store",
    "resolve_inputs",
    "run_progress",
    "split",
    "split_methods",
    "update_entries",
    "user_errors",
    "versions",
    "warn",
]

#: Exceptions that mean "the user asked for something wrong": one ``error:`` line, exit status 2. Only camkit's
#: own checks (:class:`camkit.errors.CamkitError`) and an input path that does not exist (FileNotFoundError);
#: other operating-system errors are :class:`camkit.cli.CamkitCommand`'s, and what
#: the libraries under camkit raise for a bad input is turned into a CamkitError where it is read (an image PIL
#: cannot decode: :func:`read_or_skip`). Anything else is a bug: its traceback is printed (docs/cli-errors.md).
USER_ERRORS: tuple[type[Exception], ...] = (CamkitError, FileNotFoundError)

#: PIL's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), the default of ``--max-pixels``.
DEFAULT_MAX_PIXELS = 89_478_485

#: The sample photos (:data:`camkit.io.SAMPLES`; a copy so that ``--help`` imports no torch, checked by a test).
SAMPLE_NAMES = ("chelsea", "coffee", "astronaut")

# Options several commands take with the same flags and help.
ImagesArgument = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Image files and/or folders (searched recursively for image files; hidden files skipped). "
        "Default: the --sample photo."
    ),
]
ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="efficientnet_lite0 (default, offline pretrained), a torchvision or timm name, keras:NAME, "
        "hf:DIR, yolo:CONFIG.yaml or yolo:FILE.pt, clip:ARCH or clip:DIR (with --prompt).",
    ),
]
WeightsOption = Annotated[
    Path | None,
    typer.Option(
        "--weights", help="Local state_dict file (read with weights_only=True) instead of pretrained."
    ),
]
PretrainedOption = Annotated[
    bool,
    typer.Option(
        "--pretrained/--no-pretrained",
        help="The library's pretrained weights (network needed except for the default model), or random ones "
        "drawn from --seed.",
    ),
]
SeedOption = Annotated[
    int,
    typer.Option("--seed", help="Seed of torch's random numbers: random weights (--no-pretrained), noise."),
]
PromptOption = Annotated[
    list[str] | None,
    typer.Option(
        "--prompt",
        help="CLIP models (clip:..., hf: CLIP / SigLIP folders): a text prompt, one per zero-shot class "
        "(repeat --prompt for several); the maps explain the image's similarity to one of them.",
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads of torch (default: torch's own choice)."),
]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]
LayersOption = Annotated[
    str,
    typer.Option(
        "--layers",
        "--layer",
        "-l",
        help="Target layer(s), comma-separated, or 'auto'; see `camkit layers MODEL`.",
    ),
]
MaxPixelsOption = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        help=f"Refuse images with more pixels than this (decompression bombs); default PIL's limit "
        f"{DEFAULT_MAX_PIXELS}; 0: no limit.",
    ),
]
SampleOption = Annotated[
    str,
    typer.Option("--sample", help=f"Sample photo used when no image is given: {', '.join(SAMPLE_NAMES)}."),
]
AnnotationsOption = Annotated[
    Path | None,
    typer.Option(
        "--annotations",
        "-a",
        help="camkit JSON, COCO JSON, Pascal VOC XML file or folder: each image (matched by file name) is "
        "explained for its annotated class; images without one get --target (default: their top-1), with a note.",
    ),
]
ProgressOption = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Progress bar on stderr (default: only when stderr is a terminal).",
        show_default=False,
    ),
]


def model_option(help: str) -> Any:
    """The ``--model`` option with a command's own help text."""
    return typer.Option("--model", help=help)


def out_option(help: str) -> Any:
    """The ``--out`` / ``-o`` output folder option with a command's own help text."""
    return typer.Option("--out", "-o", help=help)


def error_line(message: object, label: str = "error:", style: str = "bold red") -> Text:
    """``<label> <message>`` as one line of plain text (only ``label`` styled): the message is never read as
    markup (a file name may hold ``[/x]``), and line breaks inside it become spaces."""
    return Text.assemble((label, style), " ", " ".join(str(message).splitlines()))


def fail(err: BaseException | str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 2."""
    err_console.print(error_line(err), highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def warn(message: str) -> None:
    """Print ``error: <message>`` on stderr and go on (an input that is skipped)."""
    err_console.print(error_line(message), highlight=False, soft_wrap=True)


def note_line(message: str) -> None:
    """Print ``note: <message>`` on stderr (a remark, the command goes on)."""
    err_console.print(error_line(message, "note:", "yellow"), highlight=False, soft_wrap=True)


_AGAIN = ", then run the same command again"
_OS_ADVICE = {
    errno.ENOSPC: ("free some space or choose another --out" + _AGAIN, "free some space" + _AGAIN),
    errno.EDQUOT: ("your disk quota is used up: free some space or choose another --out" + _AGAIN,
                   "your disk quota is used up: free some space" + _AGAIN),
    errno.EROFS: ("choose a writable folder with --out", "write it to a writable file system"),
    errno.EACCES: ("check its permissions, or choose a folder you can write to with --out", "check its permissions"),
    errno.EPERM: ("check its permissions, or choose a folder you can write to with --out", "check its permissions"),
}  # fmt: skip
"""What to do after an operating-system error: (advice when the command has an ``--out``, advice without)."""


def os_error_message(err: OSError, out: Path | None = None) -> str:
    """One line for an operating-system error: what happened (``strerror`` and the errno name), where (the
    error's file; the folder of a temporary file, camkit's ``.<name>.<random>.part`` or zarr's ``.partial``; else
    ``out``) and what to do (``out``:
    the command's ``--out``, named in the advice when given)."""
    code = errno.errorcode.get(err.errno or 0, "")
    reason = err.strerror or str(err) or type(err).__name__
    line = f"{reason} ({code})" if code else reason
    where: Path | None = None
    if err.filename is not None:
        where = Path(os.fsdecode(err.filename))
        if (where.name.startswith(".") and where.suffix == ".part") or where.suffix == ".partial":
            where = where.parent  # a temporary file of an atomic write: its folder says more
    elif out is not None:
        where = out
    if where is not None:
        line += f": {str(where)!r}"
    if err.errno in _OS_ADVICE:
        line += "; " + _OS_ADVICE[err.errno][0 if out is not None else 1]
    return line


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters the user set on the command line (not left at their defaults)."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(name)
    return given


def refuse_for_store(given: set[str] | frozenset[str], model_work: Sequence[str], what: str) -> None:
    """A command given a ``camkit run`` store reads the results as the run computed them: the options in
    ``model_work`` that the user set (``given``) would change nothing, so they are an error, named as flags."""
    ignored = sorted(n for n in given if n in model_work)
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        raise CamkitError(
            f"{flags}: a store is {what} as the run computed it, nothing is recomputed; drop these options (or run "
            "`camkit run` again with them into a new store)"
        )


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the user's mistakes (:data:`USER_ERRORS`) raised inside the block into :func:`fail`."""
    try:
        yield
    except USER_ERRORS as err:
        fail(err)


def split(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def join_methods(given: list[str] | None, default: str) -> str:
    """The ``--methods`` text of an option that may be repeated (``--method gradcam --method "finercam(alpha=0.5)"``):
    the values joined by commas, in order; ``default`` when the option is not given."""
    return ",".join(given) if given is not None else default


def split_methods(text: str) -> list[str]:
    """``--methods``: ``"finercam(alpha=0.5, n_similar=2),gradcam"`` -> ``["finercam(alpha=0.5, n_similar=2)",
    "gradcam"]`` (commas inside parentheses and quotes kept; :func:`camkit.methods.registry.split_specs`)."""
    from camkit.methods.spec import split_specs

    return split_specs(text)


def file_part(name: str) -> str:
    """A method name as part of a file name: a configured name keeps letters, digits and ``._+-=,()``
    (``finercam(base='layercam')`` -> ``finercam(base=layercam)``)."""
    import re

    return re.sub(r"[^\w.+=,()-]", "", name)


def new_table(title: str, columns: Sequence[str]) -> Table:
    """A rich table with these plain columns (cells given as strings are printed as they are: the consoles read
    no markup)."""
    table = Table(title=Text(title))
    for col in columns:
        table.add_column(col, overflow="fold")  # names are never cut (a narrow or piped output folds them)
    return table


# ------------------------------------------------------------------------------------------------ models


#: The model options of every command: :class:`camkit.adapters.ModelSpec` (``model`` is its ``name``), under the
#: name the commands know.
ModelOptions = ModelSpec


def load_model(options: ModelSpec, input_size: int | None = None) -> LoadedModel:
    """The model of ``options`` (:meth:`camkit.adapters.ModelSpec.load`: ``--threads`` and ``--seed`` applied),
    at ``input_size`` when given."""
    return (options if input_size is None else replace(options, input_size=input_size)).load()


def versions() -> dict[str, str]:
    """The camkit and torch versions, for summary files."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        own = version("camkit")
    except PackageNotFoundError:
        import camkit

        own = str(getattr(camkit, "__version__", "unknown"))
    return {"camkit": own, "torch": str(torch.__version__)}


# ------------------------------------------------------------------------------------------------ inputs


def max_pixels_limit(max_pixels: int) -> int | None:
    """``--max-pixels``: 0 means no limit (None for :func:`camkit.io.load_image`)."""
    if max_pixels < 0:
        raise CamkitError(f"--max-pixels is a number of pixels (0: no limit), got {max_pixels}")
    return None if max_pixels == 0 else max_pixels


def collect_inputs(paths: Sequence[Path]) -> list[Path]:
    """The image files named or found in folders, in the order given (:func:`camkit.io.inputs.discover_images`:
    recursively, image suffixes only, hidden files and folders skipped, one order for every command).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a folder holds no image file.
    """
    from camkit.io.inputs import discover_images

    return discover_images(paths)


def read_input(path: Path, max_pixels: int | None) -> Image.Image:
    """One input image as RGB (:func:`camkit.io.load_image`)."""
    from camkit.io import load_image

    return load_image(path, max_pixels=max_pixels)


def load_pictures(
    images: Sequence[Path] | None, sample: str, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) pairs: the image files (named by their stem), or the sample photo when none."""
    from camkit.io import load_image, sample_image

    if images:
        return [(p.stem, load_image(p, max_pixels=max_pixels)) for p in images]
    return [(sample, sample_image(sample))]


@dataclass(frozen=True)
class Input:
    """One input of a command: its file (None for the sample photo), its name (the table's and summary's
    ``image``), the start of its output file names, its source."""

    path: Path | None
    name: str
    stem: str
    source: str


def resolve_inputs(images: list[Path] | None, sample: str, tag: str) -> list[Input]:
    """The inputs (folders expanded, missing files refused) with distinct, bounded output stems ending in
    ``tag``; the ``sample`` photo when no image is given."""
    from camkit.io.files import output_stems

    if not images:
        if sample not in SAMPLE_NAMES:
            raise CamkitError(f"unknown sample {sample!r}; choose one of {', '.join(SAMPLE_NAMES)}")
        return [Input(None, sample, f"{sample}{tag}", f"sample:{sample}")]
    files = collect_inputs(images)
    stems = output_stems(files, suffix_room=40 + len(tag.encode("utf-8")))
    return [Input(f, stem, f"{stem}{tag}", str(f)) for f, stem in zip(files, stems, strict=True)]


def read_or_skip(item: Input, max_pixels: int | None, alone: bool) -> Image.Image | None:
    """The input's image; an unreadable one is reported on stderr and skipped (None), or raises ValueError when
    it is the only input."""
    from camkit.io import sample_image

    if item.path is None:
        return sample_image(item.source.removeprefix("sample:"))
    try:
        return read_input(item.path, max_pixels)
    except (ValueError, OSError) as err:
        if alone:
            raise CamkitError(str(err)) from err
        warn(f"skipped {str(item.path)!r}: {err}")
        return None


# ------------------------------------------------------------------------------------------------ summaries


def previous_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of an earlier run's summary file (``[]`` when there is none); read before any model work.

    Raises:
        ValueError: the file is not a JSON list of objects (camkit does not overwrite what it did not write).
    """
    import json

    if not path.exists() and not path.is_symlink():
        return []
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CamkitError(
            f"{str(path)!r} exists and is not a camkit summary ({err}); move it away or choose another --out"
        ) from err
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise CamkitError(
            f"{str(path)!r} exists and is not a camkit summary (a JSON list of objects); move it away or choose "
            "another --out"
        )
    return value


def merge_entries(
    previous: list[dict[str, Any]], new: list[dict[str, Any]], out: Path
) -> list[dict[str, Any]]:
    """The summary rule: earlier entries whose file still exists in ``out`` and was not written again by this run,
    then this run's entries (an entry per file written)."""
    written = {Path(str(e.get("file", ""))).name for e in new}
    kept = [
        e
        for e in previous
        if isinstance(e.get("file"), str)
        and Path(e["file"]).name not in written
        and (out / Path(e["file"]).name).is_file()
    ]
    return kept + new


def update_entries(path: Path, new: list[dict[str, Any]]) -> None:
    """Merge this run's entries into the summary file ``path`` (:func:`merge_entries`) and write it, atomically.

    The read-merge-write holds an OS lock on ``.camkit-<stem>.lock`` beside the file (left in place), and the
    file is read again under it, so that runs writing into one folder at once each keep their entries.
    """
    from camkit.io.files import file_lock, write_json

    out = path.parent
    with file_lock(out / f".camkit-{path.stem}.lock", what=str(path)):
        write_json(path, merge_entries(previous_entries(path), new, out))


# ------------------------------------------------------------------------------------------------ annotations


def read_annotated(path: Path | None, inputs: Sequence[Input]) -> dict[str, Annotation]:
    """``--annotations`` read before any model work (:func:`camkit.io.annotations.read_annotations`) and matched
    to the inputs by file name, as ``camkit evaluate`` does: input name -> its annotation. Two inputs sharing a
    file name that has an annotation are ambiguous: refused."""
    if path is None:
        return {}
    from camkit.io.annotations import read_annotations

    anns = read_annotations(path)
    seen: dict[str, Path] = {}
    out: dict[str, Annotation] = {}
    for item in inputs:
        if item.path is None or item.path.name not in anns:
            continue
        if item.path.name in seen:
            raise CamkitError(
                f"two images are named {item.path.name!r} ({str(seen[item.path.name])!r}, {str(item.path)!r}) and "
                "the annotations match images by file name: rename the files or explain the folders one at a time"
            )
        seen[item.path.name] = item.path
        out[item.name] = anns[item.path.name]
    return out


def annotated_targets(anns: dict[str, Annotation], loaded: LoadedModel) -> dict[str, int | str]:
    """Input name -> the class to explain, from its annotation: an index as it is, a name checked against the
    model's labels (an unknown name: an error for camkit JSON; for COCO / VOC, whose vocabularies differ from the
    model's, a note on stderr and the image is left to --target). Inputs without a class are left out."""
    from camkit.core.targets import class_index

    out: dict[str, int | str] = {}
    labels = loaded.labels
    for name, ann in anns.items():
        cls = ann.cls
        if cls is None:
            continue
        if isinstance(cls, str) and not ann.strict_class:
            try:
                class_index(cls, len(labels) if labels else 0, labels)
            except (ValueError, TypeError):
                note_line(
                    f"{name}: annotated class {cls!r} is not a class of {loaded.name}: explaining --target"
                )
                continue
        if isinstance(cls, bool) or not isinstance(cls, (int, str)):
            raise CamkitError(f"{ann.source}: the class of {name!r} must be an index or a name, got {cls!r}")
        out[name] = cls
    return out
