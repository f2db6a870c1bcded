"""The Typer app and the one boundary where exceptions become messages and exit statuses."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from typing import NoReturn

import typer
from typer.core import TyperOption

from .. import __version__
from ..errors import ExitStatus, PersonasError, PipeClosed, Terminated
from .batch import batch
from .chat import chat
from .explain import explain
from .generate import generate
from .import_personas import import_personas
from .library import list_personas, render
from .play import play
from .serve import serve

# Typer 0.29 prints a value type after every option in --help, flags too (`--resume <bool>`), which
# reads as if they took a value. A flag takes none: its type column stays empty. Typer has no
# setting for this, so its one method that names the type is wrapped here — where it exists: the
# method is Typer's own, and a Typer without it must still run the CLI (only the column differs).
_option_type = getattr(TyperOption, "display_type_rich", None)


def _no_type_for_flags(self: TyperOption, ctx: typer.Context) -> str | None:
    return None if self.is_flag else _option_type(self, ctx)  # type: ignore[misc]


if _option_type is not None:
    TyperOption.display_type_rich = _no_type_for_flags  # type: ignore[method-assign]

app = typer.Typer(
    name="personas",
    help="Many voices from one local model: sample personas at several temperatures.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("generate")(generate)
app.command("list")(list_personas)
app.command("render")(render)
app.command("serve")(serve)
app.command("batch")(batch)
app.command("chat")(chat)
app.command("play")(play)
app.command("explain")(explain)
app.command("import")(import_personas)


def _version(value: bool) -> None:
    if value:
        print(f"personas {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    pass


def _error(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated()


# How Typer words a value outside an Enum option's choices ("'yaml' is not one of 'table', 'json'.").
_NOT_A_CHOICE = re.compile(r"(?:Value error, )?'(?P<value>.*)' is not one of (?P<choices>.*?)\.?$")


def _usage_message(error: typer.TyperException) -> str:
    """A usage error in our words: a bad choice says which values there are; others point at --help."""
    param = getattr(error, "param", None)
    if isinstance(error, typer.BadParameter) and param is not None and param.opts:
        if match := _NOT_A_CHOICE.match(error.message):
            what = param.opts[0].lstrip("-").replace("-", " ")
            choices = ", ".join(c.strip("'") for c in match["choices"].split(", "))
            return f"unknown {what} '{match['value']}' — choose one of: {choices}"
    ctx = getattr(error, "ctx", None)
    command = ctx.command_path if ctx else "personas"
    return f"{error.format_message()} — see '{command} --help'"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure ends here as one line on stderr and an exit status."""
    debug = os.environ.get("PERSONAS_DEBUG") == "1"
    args = sys.argv[1:] if argv is None else argv
    if not args:  # a bare `personas` shows the help, and is not a successful run
        app(args=["--help"], prog_name="personas", standalone_mode=False)
        return ExitStatus.BAD_INPUT
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = app(args=args, prog_name="personas", standalone_mode=False)
        if result == ExitStatus.INTERRUPTED:  # Typer turns Ctrl-C into this exit code
            _error("interrupted")
        return int(result) if isinstance(result, int) else ExitStatus.SUCCESS
    except PersonasError as e:
        if debug:
            raise
        _error(str(e))
        return e.exit_status
    except typer.TyperException as e:  # Typer's own errors: usage (exit 2) and the rest
        if e.exit_code == ExitStatus.BAD_INPUT:
            _error(_usage_message(e))
        else:
            _error(e.format_message())
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _error("interrupted")
        return ExitStatus.INTERRUPTED
    except Terminated:
        _error("terminated")
        return ExitStatus.TERMINATED
    except (BrokenPipeError, PipeClosed):
        # The reader went away (`personas generate | head -1`): nothing left to say to it.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.PIPE_CLOSED
    except Exception as e:
        if debug:
            raise
        _error(f"unexpected {type(e).__name__}: {e} — rerun with PERSONAS_DEBUG=1 for the "
               "traceback, and please report it")
        return ExitStatus.ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> NoReturn:
    """The `personas` program: `main`, then the process's end.

    Once torch (and transformers' model code) is loaded, the interpreter's own teardown — freeing
    every module, tensor and packed weight one by one — is a noticeable part of a short run that
    has nothing left to do (docs/performance.md, "How long does start-up take?"). By the time
    `main` returns, every command has written and closed its files and stopped what it started,
    so the process flushes its two streams and ends at once. Where a Ray runtime is still joined
    (a cluster's, not one personas started and stopped), Ray's exit handlers disconnect from it:
    the normal exit runs.
    """
    status = main()
    ray = sys.modules.get("ray")
    if "torch" not in sys.modules or (ray is not None and ray.is_initialized()):
        sys.exit(status)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away after the last record: as for `| head -1`
        status = ExitStatus.PIPE_CLOSED
    os._exit(status)
