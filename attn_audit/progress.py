"""Progress of long runs: the observer protocol, a silent default and a rich progress bar
(tokens/s, ETA) on stderr."""

from __future__ import annotations

import sys
from typing import Any, Protocol


class Progress(Protocol):
    """Observer for long runs; the CLI attaches a rich progress bar, the API default is silent.

    An observer may also have ``note(text)``: one line before the capture stating the work and a
    time estimate (:func:`attn_audit.provenance.announce_work`, which calibrates only for observers
    with ``note`` and a true ``wants_notes``, default true).
    """

    def start(self, label: str, total_tokens: int) -> None: ...
    def advance(self, tokens: int) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    """Progress that reports nothing (and asks for no estimate, so no calibration runs)."""

    wants_notes = False

    def note(self, text: str) -> None:
        pass

    def start(self, label: str, total_tokens: int) -> None:
        pass

    def advance(self, tokens: int) -> None:
        pass

    def finish(self) -> None:
        pass


class RichProgress:
    """One bar per length: "seq-len 512  ━━━━━  12.3k/16k tok  2.1k tok/s  0:00:04"."""

    def __init__(self, enabled: bool = True, no_color: bool = False) -> None:
        self.enabled = enabled
        self.no_color = no_color
        self._progress: Any = None
        self._task: Any = None

    @property
    def wants_notes(self) -> bool:
        return self.enabled

    def note(self, text: str) -> None:
        """Print ``text`` (the work and its estimate) on its own line on stderr."""
        if self.enabled:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def start(self, label: str, total_tokens: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(file=sys.stderr, no_color=self.no_color)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("tok"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal and False,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total_tokens, rate="")

    def advance(self, tokens: int) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task, tokens)
        task = self._progress.tasks[0]
        speed = task.speed
        self._progress.update(self._task, rate=f"{speed:,.0f} tok/s" if speed else "")

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
