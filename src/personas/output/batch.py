"""`personas batch`'s output lines, as JSONL (OpenAI's batch output, line by line) or Parquet."""

from __future__ import annotations

import enum
import json
from typing import IO, Any

# Lines kept before a Parquet row group is written: a long batch never holds all its answers.
ROW_GROUP_LINES = 1024


class BatchFormat(enum.StrEnum):
    """How `batch` writes its output."""

    JSONL = "jsonl"
    PARQUET = "parquet"


class JsonlLines:
    """Each output line written and flushed as its request completes."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def add(self, line: dict[str, Any]) -> None:
        self.stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class ParquetLines:
    """The output lines as a Parquet table, one row per request, typed columns: the envelope
    (`id`, `custom_id`, `status_code`, `request_id`), the answer's `model`, each choice's text and
    finish reason (lists), the token counts; for a refused request its error's type and message;
    and `response`, the whole response body as JSON text (log-probabilities and all). Written in
    row groups as requests complete; the stream must be a file's (`--output`)."""

    def __init__(self, stream: IO[str]):
        import pyarrow as pa

        self.stream = stream
        self.schema = pa.schema([
            ("id", pa.string()), ("custom_id", pa.string()), ("status_code", pa.int32()),
            ("request_id", pa.string()), ("model", pa.string()), ("contents", pa.list_(pa.string())),
            ("finish_reasons", pa.list_(pa.string())), ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()), ("error_type", pa.string()), ("error_message", pa.string()),
            ("response", pa.string()),
        ])
        self.rows: list[dict[str, Any]] = []
        self.writer = None

    def add(self, line: dict[str, Any]) -> None:
        response = line["response"]
        body = response["body"]
        error = body.get("error") if isinstance(body.get("error"), dict) else None
        choices = body.get("choices", [])
        usage = body.get("usage") or {}
        self.rows.append({
            "id": line["id"], "custom_id": line["custom_id"], "status_code": response["status_code"],
            "request_id": response["request_id"], "model": body.get("model"),
            "contents": [c["message"]["content"] for c in choices] if not error else None,
            "finish_reasons": [c["finish_reason"] for c in choices] if not error else None,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "error_type": error["type"] if error else None, "error_message": error["message"] if error else None,
            "response": json.dumps(body, ensure_ascii=False),
        })
        if len(self.rows) >= ROW_GROUP_LINES:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.stream.flush()
            self.writer = pq.ParquetWriter(self.stream.buffer, self.schema)
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows.clear()

    def close(self) -> None:
        if self.rows or self.writer is None:
            self._write()
        self.writer.close()


def batch_writer(fmt: BatchFormat, stream: IO[str]) -> JsonlLines | ParquetLines:
    return ParquetLines(stream) if fmt == BatchFormat.PARQUET else JsonlLines(stream)
