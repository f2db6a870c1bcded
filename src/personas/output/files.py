"""`--output FILE`: where results go when not to stdout, without ever losing what was there.

* json, csv and table are written to a temporary file beside the target and renamed over it
  only when the run has finished: an interrupted or failed run leaves the old file untouched.
* jsonl is written line by line and flushed, so every finished sample is on disk at once (the
  file is opened when the first sample arrives); with `--resume` the rows already in the file
  are read back, not generated again, and the rest appended.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InputError, PersonaFileError
from ..record import resume_key


class OutputFile:
    """A file the user asked for, written so that a failed run never leaves it half-written."""

    def __init__(self, path: Path, fmt: str, resume: bool = False):
        self.path = path
        if not path.parent.is_dir():
            raise InputError(f"cannot write {path}: the folder {path.parent} does not exist", "create it first")
        if path.is_dir():
            raise InputError(f"cannot write {path}: it is a folder", "give a file name")
        if resume and fmt != "jsonl":
            raise InputError("--resume works with --format jsonl only", "use --format jsonl")
        self._temporary: str | None = None
        self.resumed = resume
        try:
            if fmt == "jsonl" and resume:
                _drop_torn_last_line(path)
                self.stream: IO[str] | _OpenOnFirstWrite = open(path, "a", encoding="utf-8")
            elif fmt == "jsonl":
                _check_writable(path)
                # Opened (and the old file replaced) only when the first sample arrives, so a run
                # that fails before it — a model that cannot load — leaves the old file alone.
                self.stream = _OpenOnFirstWrite(path)
            else:
                fd, self._temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                self.stream = os.fdopen(fd, "w", encoding="utf-8", newline="")
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror}", "check the path and its permissions") from None

    def commit(self) -> None:
        self.stream.close()
        if self._temporary:
            os.replace(self._temporary, self.path)

    def abandon(self) -> None:
        self.stream.close()
        if self._temporary:
            os.unlink(self._temporary)


class _OpenOnFirstWrite:
    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] | None = None

    def write(self, text: str) -> int:
        if self._file is None:
            self._file = open(self.path, "w", encoding="utf-8")
        return self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _check_writable(path: Path) -> None:
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise PermissionError(13, "Permission denied")


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, its JSON value, or None where the line is not JSON) of a jsonl output."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            try:
                yield number, json.loads(line)
            except ValueError:
                yield number, None


def finished_rows(path: Path) -> set[tuple]:
    """(persona, prompt, temperature, sample, seed) of every valid line of a jsonl output."""
    done: set[tuple] = set()
    if not path.is_file():
        return done
    for _, r in _json_lines(path):
        try:
            done.add(resume_key(r["persona"], r["prompt"], r["temperature"], r["sample"], r["seed"]))
        except (KeyError, TypeError):
            continue  # not one of ours, or torn: generated again
    return done


def answered_ids(path: Path) -> set[str]:
    """The custom_ids an earlier `batch` run wrote to `path`; a line that is not one of its output
    lines is an error (the file is not a batch output, and appending to it would mix the two)."""
    done: set[str] = set()
    for number, item in _json_lines(path):
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
            raise PersonaFileError(str(path), number, "not a batch output line",
                                   "--resume continues a file that batch wrote; check --output")
        done.add(item["custom_id"])
    return done


def _drop_torn_last_line(path: Path) -> None:
    """A run killed mid-write can leave half a line; cut it so appended lines start clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
