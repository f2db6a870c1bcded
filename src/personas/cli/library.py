"""`personas list` and `personas render`: looking at personas and the exact prompts they make."""

from __future__ import annotations

import enum
import json
import sys
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..errors import InputError
from ..library.load import find_library_file, load_library
from ..model.prompt import Dialog, llama2_text
from ..output.records import ReportFormat
from .feedback import Feedback
from .loading import load_model_for, model_options
from .options import FileOpt, ModelOpt, PromptOpt


class RenderTemplate(enum.StrEnum):
    """render --template: a format named outright (no `auto`: there may be no model to ask)."""

    LLAMA2 = "llama2"
    MODEL = "model"


def list_personas(
    file: FileOpt = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", "-f")] = ReportFormat.TABLE,
) -> None:
    """Show the personas in the persona file."""
    library = load_library(find_library_file(file))
    if fmt == ReportFormat.JSON:
        rows = [p.model_dump(exclude_none=True) for p in library.personas.values()]
        sys.stdout.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
        return
    table = Table(box=box.SIMPLE_HEAD, caption=str(library.path), caption_justify="left")
    for column in ("persona", "description", "examples", "default prompt"):
        table.add_column(column, overflow="fold")
    for p in library.personas.values():
        table.add_row(Text(p.name, style="bold cyan"), p.description or "", str(len(p.examples)),
                      p.prompt or Text("(none: pass --prompt)", style="dim"))
    console = Console()
    console.print(table)
    if library.games:
        games = Table(box=box.SIMPLE_HEAD)
        for column in ("game", "description", "players (team)", "turns", "wins counted for"):
            games.add_column(column, overflow="fold")
        for g in library.games.values():
            players = ", ".join(name + (f" ({g.team_of(name)})" if g.team_of(name) != name else "")
                                for name in g.players)
            games.add_row(Text(g.name, style="bold cyan"), g.description or "", players, str(g.max_turns),
                          g.scored_side)
        console.print(games)


def render(
    name: Annotated[str, typer.Argument(help="The persona to render.", show_default=False)],
    prompt: PromptOpt = None,
    file: FileOpt = None,
    template: Annotated[RenderTemplate, typer.Option(
        "--template", help="llama2 (Meta's Llama-2-chat format; no model needed) or model "
        "(the model's own chat template).")] = RenderTemplate.LLAMA2,
    model: ModelOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Print exactly the text that is tokenized, "
                                      "special tokens written as text, and nothing else.")] = False,
    ids: Annotated[bool, typer.Option("--ids", help="Print the token ids the model sees, "
                                      "space-separated on one line, and nothing else.")] = False,
) -> None:
    """Print a persona's exact prompt and its token count."""
    if raw and ids:
        raise InputError("--raw and --ids cannot be combined", "choose one")
    library = load_library(find_library_file(file))
    persona = library.get(name)
    text = prompt if prompt is not None else persona.prompt
    if text is None:
        raise InputError(f"persona '{name}' has no default prompt", "pass --prompt TEXT")
    if not text.strip():
        raise InputError("the prompt is empty", "pass a non-empty --prompt")
    dialog = Dialog.for_persona(persona, text)

    if raw and template == RenderTemplate.LLAMA2:  # pure text: no tokenizer needed at all
        sys.stdout.write(llama2_text(dialog))
        return

    loaded = load_model_for(model_options(library.defaults, model), Feedback(quiet=raw or ids), tokenizer_only=True)
    prompt_text = loaded.prompt_text(dialog, template)
    if raw:
        sys.stdout.write(prompt_text)
        return
    token_ids = loaded.prompt_ids(dialog, template)
    if ids:
        sys.stdout.write(" ".join(map(str, token_ids)) + "\n")
        return
    title = f"{name} · template {template}"
    subtitle = f"{len(token_ids)} tokens (tokenizer of {loaded.label})"
    Console().print(Panel(Text(prompt_text), title=title, subtitle=subtitle, title_align="left",
                          subtitle_align="right"))
