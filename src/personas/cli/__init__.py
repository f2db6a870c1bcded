"""The Typer app and the one boundary where exceptions become messages and exit statuses."""

from __future__ import annotations

import os
import signal
import sys

import typer

try:  # Typer 0.29 carries its own copy of click; its exceptions are the ones raised then.
    from typer._click import exceptions as click_errors
except ImportError:  # older Typer runs on click itself
    from click import exceptions as click_errors

from .. import __version__
from ..errors import ExitStatus, PersonasError, PipeClosed, Terminated
from .chat import chat, play
from .explain import explain
from .generate import generate
from .library import list_personas, render
from .serve import serve

app = typer.Typer(
    name="personas",
    help="Many voices from one local model: sample personas at several temperatures.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("generate")(generate)
app.command("list")(list_personas)
app.command("render")(render)
app.command("serve")(serve)
app.command("chat")(chat)
app.command("play")(play)
app.command("explain")(explain)


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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure ends here as one line on stderr and an exit status."""
    debug = os.environ.get("PERSONAS_DEBUG") == "1"
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = app(args=argv, prog_name="personas", standalone_mode=False)
        if result == ExitStatus.INTERRUPTED:  # Typer turns Ctrl-C into this exit code
            _error("interrupted")
        return int(result) if isinstance(result, int) else ExitStatus.SUCCESS
    except PersonasError as e:
        if debug:
            raise
        _error(str(e))
        return e.exit_status
    except click_errors.NoArgsIsHelpError:
        return ExitStatus.BAD_INPUT  # the help was printed already
    except click_errors.UsageError as e:
        command = e.ctx.command_path if e.ctx else "personas"
        _error(f"{e.format_message()} — see '{command} --help'")
        return ExitStatus.BAD_INPUT
    except click_errors.ClickException as e:
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
