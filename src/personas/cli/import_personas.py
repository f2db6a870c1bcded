"""`personas import`: personas from character cards, TinyTroupe agents and PersonaHub lines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..library.edit import add_personas
from ..library.load import candidate_paths
from ..library.sources import read_sources


def import_personas(
    sources: Annotated[list[Path], typer.Argument(
        help="Character Card V1/V2/V3 (.png or .json), TinyTroupe agent (.agent.json) or PersonaHub (.jsonl) "
        "files.", show_default=False, dir_okay=False)],
    file: Annotated[Optional[Path], typer.Option(
        "--file", help="The persona file to add to, created if missing (default: $PERSONAS_FILE, else "
        "./personas.toml).", dir_okay=False, show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Name the persona (one source); for PersonaHub lines, the prefix of NAME-1, NAME-2, …",
        show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", help="At most this many PersonaHub lines per file.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a persona of the same name.")] = False,
) -> None:
    """Add personas from files people keep them in; every existing line of the persona file stays."""
    target = file if file is not None else candidate_paths()[0]  # $PERSONAS_FILE, else ./personas.toml
    added = add_personas(target, read_sources(sources, name, limit), force)
    for entry in added:
        p = entry.imported
        parts = [f"{len(p.system)} characters of system context",
                 f"{len(p.examples)} example{'s' if len(p.examples) != 1 else ''}"] + (["an opener"] if p.opener else [])
        verb = "replaced" if entry.replaced else "added"
        sys.stdout.write(f"{verb} {p.name}: {p.kind} from {p.source} ({', '.join(parts)})\n")
    sys.stderr.write(f"{len(added)} persona{'s' if len(added) != 1 else ''} written to {target}\n")
