"""One exception family and the exit-status table.

Every failure a user can cause or meet is a `PersonasError`; the CLI's single `main()` boundary
turns it into one line on stderr and the exit status it carries. Nothing else in the package
prints errors or calls `sys.exit`.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """What the process exits with (README: Errors and exit statuses)."""

    SUCCESS = 0
    ERROR = 1  # runtime failure: the model cannot load, out of memory after retries, ...
    BAD_INPUT = 2  # usage, TOML, unknown persona, bad values
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    PIPE_CLOSED = 141  # the reader of stdout went away (128 + SIGPIPE), as `yes | head` ends
    TERMINATED = 143  # SIGTERM (128 + 15)


class Terminated(BaseException):
    """SIGTERM, raised where the program happens to be so that cleanup (closing files) runs.

    A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it.
    """


class PersonasError(Exception):
    """A failure with a message for the user and, where there is one, what to do about it."""

    exit_status = ExitStatus.ERROR

    def __init__(self, what: str, todo: str | None = None):
        super().__init__(what)
        self.what = what
        self.todo = todo

    def __str__(self) -> str:
        return f"{self.what} — {self.todo}" if self.todo else self.what


class InputError(PersonasError):
    """The user's input is wrong: a flag value, a persona file, a persona name."""

    exit_status = ExitStatus.BAD_INPUT


class PersonaFileError(InputError):
    """A persona file that cannot be read, parsed or validated; carries file and line."""

    def __init__(self, path: str, line: int | None, what: str, todo: str | None = None):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {what}", todo)
        self.path = path
        self.line = line


class ModelError(PersonasError):
    """The model cannot be found, loaded or run."""

    exit_status = ExitStatus.ERROR


class PipeClosed(BaseException):
    """stdout's reader went away (`personas generate | head -1`).

    Raised in place of BrokenPipeError so that Typer, which turns that error into exit 1,
    lets it through to the CLI boundary.
    """
