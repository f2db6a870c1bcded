"""On the CPU: a family the decode engine runs against one it routes to the chunked fallback, on
the same tiny shapes, in one run.

Two random models of one size (4 layers, width 256, 8 heads, 4 KV heads, the Llama-2 vocabulary
from ../shared/testdata): a Llama (the engine) and a Gemma 2 (transformers' `generate` in
chunks, the path every family outside decoder.FAMILIES takes). The same grid on each — 32 rows
(8 prompts × 4 samples) × exactly 64 new tokens — through `sample_rows`, as `generate` runs it,
alternating, the median of `--repeats` runs. The numbers say what a user of an unsupported family
gives up; Gemma's own layers (soft-capping, its norms) cost a little more than Llama's, so the
ratio slightly flatters the engine.

    .venv/bin/python benchmarks/bench_families_cpu.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_name  # noqa: E402

VOCAB = REPO.parent / "shared" / "testdata" / "ggml-vocab-llama-spm.gguf"
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024)
ASKS = ["What do you see tonight?", "How old is the lamp?", "Do you like storms?", "Who brings the food?",
        "What is the best hour?", "Where do the gulls sleep?", "Is the sea cold?", "What did you read today?"]


def write(kind: str, directory: Path, tokenizer) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 32} if kind == "gemma2" else {}
    config = AutoConfig.for_model(kind, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **SHAPE, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not VOCAB.is_file():
        sys.exit(f"needs the Llama-2 vocabulary at {VOCAB}")

    import torch
    from transformers import AutoTokenizer

    from personas.engine.decoder import supports
    from personas.engine.loop import sample_rows
    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.sampling.grid import Row, Settings

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(VOCAB.parent, gguf_file=VOCAB.name)
    settings = Settings(max_new_tokens=64, min_new_tokens=64)
    with tempfile.TemporaryDirectory(prefix="personas-families-") as folder:
        models = {kind: load_model(resolve_model(str(write(kind, Path(folder) / kind, tokenizer))), device="cpu")
                  for kind in ("llama", "gemma2")}
    rows = {kind: [Row("keeper", ask, 1.0, k, 100 * i + k, tuple(m.tokenizer.encode("You keep a lighthouse. " + ask)))
                   for i, ask in enumerate(ASKS) for k in range(1, 5)] for kind, m in models.items()}
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for _ in range(args.repeats):
        for kind, model in models.items():
            done: list = []
            started = time.perf_counter()
            with torch.inference_mode():
                sample_rows(settings, model, rows[kind], done.append)
            times[kind].append(time.perf_counter() - started)
            assert len(done) == len(rows[kind]) and all(len(s.token_ids) == 64 for s in done)
    tokens = len(ASKS) * 4 * 64
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}")
    print(f"work: {len(ASKS) * 4} rows × 64 new tokens; both models 4 layers × width 256; medians of {args.repeats}\n")
    print("| family | path | seconds | tokens/s |")
    print("|---|---|---:|---:|")
    for kind, model in models.items():
        seconds = statistics.median(times[kind])
        path = "decode engine" if supports(model.model) else "chunked fallback (transformers' generate)"
        print(f"| {kind} | {path} | {seconds:.2f} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    main()
