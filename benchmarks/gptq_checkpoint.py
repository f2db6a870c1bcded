"""Write a random GPTQ checkpoint with the exact layout of TheBloke/Llama-2-{13,7}B-chat-GPTQ (or of
today's 4-bit Llama-3.1-8B and Qwen2.5-7B checkpoints).

The GPU machine reaches no hub, so the benchmark makes its own model: the same tensor names,
shapes and dtypes as TheBloke's 4-bit, group-size-128, no-act-order files (AutoGPTQ v1
format: `qweight`, `qzeros`, `scales`, `g_idx` per linear layer; fp16 embeddings, norms and
lm_head), the same `quantization_config` / `quantize_config.json`, random packed weights with
scales chosen so activations stay finite, and a small byte-level BPE tokenizer made in code,
padded to Llama-2's 32,000 ids. `personas generate --model DIR` loads it like the real thing.

`--shape llama3-8b` and `--shape qwen2.5-7b` write the shapes people run today in 4 bits (as
hugging-quants' Meta-Llama-3.1-8B-Instruct-GPTQ-INT4 and Qwen's Qwen2.5-7B-Instruct-GPTQ-Int4 lay
them out: group size 128, no act-order): grouped KV heads, Llama 3's `llama3` rope scaling and
128,256 ids, Qwen's q/k/v bias and 152,064 ids; the tokenizer is padded to each vocabulary.
`tiny-llama3` and `tiny-qwen2` are the same families at a size for checking the path on a CPU.

    python benchmarks/gptq_checkpoint.py OUT_DIR [--shape 13b|7b|llama3-8b|qwen2.5-7b|tiny] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-2 7B/13B, Llama 3.1 8B, Qwen 2.5 7B; the "tiny" ones for a quick check of the path itself
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    "tiny-llama3": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2),
    "tiny-qwen2": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
}
VOCAB = 32000
# What a family changes from Llama 2's config: its architecture, vocabulary and rope settings.
FAMILY = {
    "llama2": {},
    "llama3": {"vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
              "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28},
}


def family_of(shape: str) -> str:
    return "llama3" if "llama3" in shape else "qwen2" if "qwen2" in shape else "llama2"


def vocab_of(shape: str) -> int:
    return FAMILY[family_of(shape)].get("vocab_size", VOCAB)
GROUP = 128
BITS = 4

QUANTIZE_CONFIG = {  # as in TheBloke's quantize_config.json
    "bits": BITS, "group_size": GROUP, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
    "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
}


def llama_config(shape: str) -> dict:
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 4096,
        "num_key_value_heads": s["num_attention_heads"], "pretraining_tp": 1, "rms_norm_eps": 1e-5,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
        "vocab_size": VOCAB, **s, **FAMILY[family_of(shape)],
        "quantization_config": {**QUANTIZE_CONFIG, "quant_method": "gptq"},
    }


def linear_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each quantized linear in one decoder layer."""
    h, i = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
    heads = SHAPES[shape]["num_attention_heads"]
    kv = h // heads * SHAPES[shape].get("num_key_value_heads", heads)  # grouped KV heads: narrower k and v
    return {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h),
    }


def quantized_linear(in_f: int, out_f: int, generator: torch.Generator, device: str) -> dict[str, torch.Tensor]:
    # Random 4-bit codes, uniform on 0..15, packed eight to an int32 along the input dimension.
    words = torch.randint(-(2**31), 2**31, (in_f // 8, out_f), dtype=torch.int64, generator=generator,
                          device=device).to(torch.int32)
    # Symmetric quantization, AutoGPTQ v1 stores zero - 1 = 7 in every nibble.
    qzeros = torch.full((in_f // GROUP, out_f // 8), 0x77777777, dtype=torch.int32, device=device)
    # w = scale * (q - 8) has std ≈ 4.6 * scale; 1/sqrt(in_f) keeps each layer's output at unit scale.
    scales = torch.full((in_f // GROUP, out_f), 1.0 / (4.6 * math.sqrt(in_f)), dtype=torch.float16, device=device)
    g_idx = torch.arange(in_f, dtype=torch.int32, device=device) // GROUP
    return {"qweight": words, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def write_checkpoint(out: Path, shape: str = "13b", device: str = "cpu", seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape)
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    vocab = config["vocab_size"]
    g = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": (torch.randn(vocab, h, generator=g, device=device) * 0.02).half(),
        "lm_head.weight": (torch.randn(vocab, h, generator=g, device=device) / math.sqrt(h) * 4).half(),
        "model.norm.weight": torch.ones(h, dtype=torch.float16, device=device),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16, device=device)
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16, device=device)
        for name, (in_f, out_f) in linear_shapes(shape).items():
            for key, value in quantized_linear(in_f, out_f, g, device).items():
                tensors[f"{prefix}{name}.{key}"] = value
            if family_of(shape) == "qwen2" and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                tensors[f"{prefix}{name}.bias"] = (torch.randn(out_f, generator=g, device=device) * 0.1).half()
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps(QUANTIZE_CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.6,
         "top_p": 0.9, "max_length": 4096}, indent=2))
    write_tokenizer(out, vocab)
    return out


def write_tokenizer(out: Path, vocab: int = VOCAB) -> None:
    """A byte-level BPE trained on the persona library, padded with unused tokens to `vocab` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (Path(__file__).resolve().parents[1] / "personas.toml").read_text(encoding="utf-8")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(text.splitlines() * 4, trainer)
    backend.add_tokens([f"<unused{i}>" for i in range(vocab - backend.get_vocab_size())])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>")
    assert len(tokenizer) == vocab, len(tokenizer)
    tokenizer.save_pretrained(out)


def load_checkpoint(directory: Path, gptq_backend: str = "auto", device: str = "cuda", fuse: bool = True,
                    shape: str = "13b"):
    """The checkpoint at `directory`, written first (of `shape`) if it is not there, loaded by
    personas (with q/k/v and gate/up fused unless `fuse` is False)."""
    from personas.model.choice import resolve_model
    from personas.model.load import load_model

    if not (directory / "model.safetensors").is_file():
        write_checkpoint(directory, shape, device)
    return load_model(resolve_model(str(directory)), device=device, gptq_backend=gptq_backend, fuse_gptq=fuse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=list(SHAPES), default="13b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    started = time.perf_counter()
    write_checkpoint(args.out, args.shape, args.device)
    size = (args.out / "model.safetensors").stat().st_size
    print(f"wrote {args.shape} GPTQ checkpoint to {args.out}: {size / 1e9:.2f} GB in "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
