"""A random model of a real shape as a 4-bit GGUF file, for comparing engines on a bigger model
than the embedded one — and the same weights as a safetensors folder for personas.

The shape is Llama-3.2-1B's (16 layers, hidden 2,048, MLP 8,192, 32 query and 8 key/value heads
of 64, vocabulary 128,256), with the real Llama-3 vocabulary and merges from
`../shared/testdata/ggml-vocab-llama-bpe.gguf` and Meta's Llama-3 chat template, so prompts and
token counts are real; the weights are random normal (std 0.02), quantized by gguf-py to Q4_0 (or
`--qtype`). Two simplifications, neither of which changes what a step reads or computes: the
output matrix is written beside the embedding (Llama-3.2-1B ties them; both engines read a head
of the same size either way) and rope is plain rope at θ = 500,000 (without llama3 scaling).

personas converts a GGUF file once, on its first start, into a dequantized float32 copy in its
cache with the file's blocks beside it (model/gguf_cache.py; a few minutes for this shape on two
cores): `--folder` writes that
same copy where you choose, so that `personas --model FOLDER` loads in seconds from the first run
on and a benchmark never times the conversion — the same weights, value for value.

    .venv/bin/python benchmarks/random_gguf.py [--out .peer/llama3.2-1b-q4_0.gguf] [--qtype Q4_0]
        [--folder .peer/llama3.2-1b-q4_0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, log  # noqa: E402

VOCABULARY = REPO.parent / "shared" / "testdata" / "ggml-vocab-llama-bpe.gguf"
SHAPES = {
    "llama3.2-1b": dict(layers=16, hidden=2048, mlp=8192, heads=32, kv_heads=8, vocabulary=128256),
}
# Meta's Llama-3 chat template, as tests/test_engine_families.py renders it.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def write_gguf(out: Path, shape: dict, qtype_name: str, seed: int = 0) -> None:
    """A random Llama of `shape` as a GGUF file. Beside the sizes, a shape may name its
    `vocabulary_file` (a vocabulary-only GGUF), the `tokenizer_keys` taken from it (None: all of
    them), its chat `template`, `rope_theta`, `context`, and the weights' `scale` and
    `embedding_scale` (the tests' tiny model uses larger ones, so that its tokens vary)."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[qtype_name]
    vocab = GGUFReader(str(shape.get("vocabulary_file", VOCABULARY)))
    keys = shape.get("tokenizer_keys", TOKENIZER_KEYS) or [k for k in vocab.fields if k.startswith("tokenizer.")]
    vocabulary = shape.get("vocabulary") or len(vocab.fields["tokenizer.ggml.tokens"].contents())
    scratch = out.with_suffix(".partial")  # renamed when whole: an interrupted run leaves no half file
    writer = GGUFWriter(str(scratch), "llama")
    head_dim = shape["hidden"] // shape["heads"]
    writer.add_name(f"random {out.stem}")
    writer.add_block_count(shape["layers"])
    writer.add_context_length(shape.get("context", 8192))
    writer.add_embedding_length(shape["hidden"])
    writer.add_feed_forward_length(shape["mlp"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_rope_freq_base(shape.get("rope_theta", 500000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocabulary)
    writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype_name])
    for key in keys:
        field = vocab.fields[key]
        value = field.contents()
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, value)
        else:
            writer.add_key_value(key, value, kind)
    writer.add_chat_template(shape.get("template", LLAMA3_TEMPLATE))

    generator = np.random.default_rng(seed)

    def matrix(name: str, rows: int, columns: int, scale: float = shape.get("scale", 0.02)) -> None:
        weights = (generator.standard_normal((rows, columns), dtype=np.float32) * scale).astype(np.float32)
        writer.add_tensor(name, quantize(weights, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(shape["hidden"], dtype=np.float32))

    hidden, kv = shape["hidden"], shape["kv_heads"] * head_dim
    embedding_scale = shape.get("embedding_scale", shape.get("scale", 0.02))
    matrix("token_embd.weight", vocabulary, hidden, embedding_scale)
    norm("output_norm.weight")
    matrix("output.weight", vocabulary, hidden, embedding_scale)
    for i in range(shape["layers"]):
        log(f"layer {i + 1} of {shape['layers']}")
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", shape["mlp"], hidden)
        matrix(f"blk.{i}.ffn_up.weight", shape["mlp"], hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, shape["mlp"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    scratch.rename(out)


def write_folder(gguf_file: Path, folder: Path) -> None:
    """The GGUF dequantized as `personas --model FILE.gguf` converts it, saved once into `folder`."""
    from personas.model.gguf_cache import write_converted

    write_converted(gguf_file, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    parser.add_argument("--qtype", choices=("Q4_0", "Q4_1", "Q8_0"), default="Q4_0")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or REPO / ".peer" / f"{args.shape}-{args.qtype.lower()}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not out.is_file():
        write_gguf(out, SHAPES[args.shape], args.qtype)
        log(f"wrote {out} ({out.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s")
    if args.folder is not None and not (args.folder / "config.json").is_file():
        write_folder(out, args.folder)
        log(f"wrote {args.folder} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
