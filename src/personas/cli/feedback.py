"""What a person sees on stderr: status lines, a spinner while loading, a bar while generating.

Data goes to stdout and never through here. On a terminal, rich draws live progress; when
stderr is not a terminal (a script, CI), only plain one-line messages are written.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class Feedback:
    def __init__(self, quiet: bool = False):
        # Bound to the real stderr now: library output is redirected while models load.
        self.console = Console(file=sys.stderr, highlight=False)
        self.live = self.console.is_terminal
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            # soft_wrap: one message, one line, also in a log file (a server's stderr)
            self.console.print(message, style="dim", markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"Warning: {message}", style="yellow", markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def loading(self, what: str) -> Iterator[Callable[[str], None]]:
        """A spinner on a terminal; yields a function that updates the status line."""
        if self.live and not self.quiet:
            with self.console.status(what) as status:
                yield lambda message: status.update(message)
        else:
            yield self.info

    @contextlib.contextmanager
    def generating(self, rows: int, steps: int | None) -> Iterator[tuple[Callable[[int], None], Callable[[], None]]]:
        """A bar over decode steps (none when `steps` is None: workers elsewhere report no steps)
        and a count of finished samples; yields (on_step, on_sample)."""
        if not self.live or self.quiet:
            yield (lambda _: None), (lambda: None)
            return
        progress = self._progress()
        with progress:
            step_task = progress.add_task("tokens ", total=steps) if steps is not None else None
            sample_task = progress.add_task("samples", total=rows)
            yield (lambda step: step_task is not None and progress.update(step_task, completed=step)), (
                lambda: progress.advance(sample_task))

    @contextlib.contextmanager
    def playing(self, turns: int, steps: int) -> Iterator[tuple[Callable[[int, int, int], None], Callable[[int], None]]]:
        """Bars over a game's turns and the current turn's tokens; yields (on_turn, on_step)."""
        if not self.live or self.quiet:
            yield (lambda _t, _cap, _live: None), (lambda _: None)
            return
        progress = self._progress()
        with progress:
            turn_task = progress.add_task("turns  ", total=turns)
            step_task = progress.add_task("tokens ", total=steps)

            def on_turn(turn: int, cap: int, live: int) -> None:
                progress.update(turn_task, completed=turn - 1, total=cap,
                                description=f"turns ({live} episode{'s' if live != 1 else ''} running)")
                progress.update(step_task, completed=0)

            yield on_turn, (lambda step: progress.update(step_task, completed=step))

    def _progress(self) -> Progress:
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)


def truncation_warning(feedback: Feedback) -> Callable[[str, int], None]:
    """A warning for a speaker whose transcript no longer fits the context: once per speaker,
    since a long chat would otherwise warn every turn."""
    warned: set[str] = set()

    def warn(who: str, dropped: int) -> None:
        if who not in warned:
            warned.add(who)
            feedback.warn(f"{who}'s prompt no longer fits the model's context: the oldest exchanges "
                          f"are dropped from it ({dropped} so far)")
    return warn
