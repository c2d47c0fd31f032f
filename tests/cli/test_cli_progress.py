"""The one progress helper of the commands (:mod:`camkit.cli.progress`): every bar's text columns read no markup, and
every command's bar is built by it."""

from __future__ import annotations

import inspect

import pytest
from rich.progress import TextColumn

from camkit.cli import evaluate, explain, localize, progress, run
from camkit.cli.progress import images_progress, progress_bar, run_progress, step_progress


def test_text_columns_read_no_markup() -> None:
    with progress_bar(
        "{task.description}", "bar", "m/n", "[bold]plain[/bold]", "elapsed", enabled=False
    ) as bar:
        texts = [c for c in bar.columns if isinstance(c, TextColumn)]
        assert len(texts) == 2 and all(c.markup is False for c in texts)
        task = bar.add_task("[red]IMG [copy].jpg[/]", total=1)
        assert [c.render(bar.tasks[task]).plain for c in texts] == [
            "[red]IMG [copy].jpg[/]",
            "[bold]plain[/bold]",
        ]


@pytest.mark.parametrize("helper", [images_progress, step_progress])
def test_the_command_bars_are_built_by_the_helper(helper, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[object, ...]] = []
    real = progress.progress_bar

    def spy(*columns: object, enabled: bool = True):
        built.append(columns)
        return real(*columns, enabled=enabled)

    monkeypatch.setattr(progress, "progress_bar", spy)
    with helper(True):
        pass
    with run_progress(2, steps=1, enabled=True):
        pass
    assert len(built) == 2


def test_no_command_builds_a_bar_of_its_own() -> None:
    for module in (explain, localize, evaluate, run):
        source = inspect.getsource(module)
        assert "rich.progress" not in source and "Progress(" not in source, module.__name__
