"""How far the engine's first-token logits are from transformers' on the 13B GPTQ checkpoint.

For each of the bulk job's first prompts: transformers' forward over the whole prompt; the
engine's decoder over the whole prompt in one pass (no prefix); and the engine as it runs (the
shared prefix from the pool, then the suffix). Prints the largest logit difference against the
logits' spread and whether the argmax agrees — to tell near-ties under half precision from a
real difference.

    python benchmarks/engine_logit_check.py [--prompts 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_prompts import persona_rows  # noqa: E402
from gptq_checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    args = parser.parse_args()

    from personas.sampling.decoder import Decoder, Part
    from personas.sampling.engine import PrefixPool
    from personas.sampling.grid import Settings

    model = load_checkpoint(args.checkpoint, "marlin")
    rows = persona_rows(model, args.prompts, 0.0, Settings())
    decoder = Decoder(model.model)
    shared = len(os.path.commonprefix([r.prompt_ids for r in rows]))
    prefix = rows[0].prompt_ids[:shared]
    pool = PrefixPool(decoder)
    print(f"card: {torch.cuda.get_device_name()}; {len(rows)} prompts, {shared} tokens shared\n")
    print("| prompt | logit spread (std) | max |HF − one pass| | max |HF − prefix + suffix| | argmax HF / one pass / split | HF top-2 gap |")
    print("|---|---:|---:|---:|---|---:|")
    with torch.inference_mode():
        pool.ensure(prefix)
        for i, row in enumerate(rows):
            ids = torch.tensor([row.prompt_ids], device="cuda")
            hf = model.model(ids).logits[0, -1].float()
            n = len(row.prompt_ids)
            causal = torch.full((n, n), float("-inf"), device="cuda").triu_(1)[None]
            whole = decoder.run(ids, torch.arange(n, device="cuda")[None],
                                lambda layer, k, v: Part(k, v, causal, shared=False), None,
                                torch.tensor([n - 1], device="cuda"))[0]
            suffix = row.prompt_ids[shared:]
            m = len(suffix)
            causal_s = torch.full((m, m), float("-inf"), device="cuda").triu_(1)[None]
            bias = pool.bias([prefix])
            split = decoder.run(torch.tensor([suffix], device="cuda"), torch.arange(shared, n, device="cuda")[None],
                                lambda layer, k, v: Part(k, v, causal_s, shared=False),
                                pool.parts(bias, pool.read_length()), torch.tensor([m - 1], device="cuda"))[0]
            top2 = hf.topk(2).values
            print(f"| {i} | {hf.std():.2f} | {(hf - whole).abs().max():.3f} | {(hf - split).abs().max():.3f} | "
                  f"{hf.argmax().item()} / {whole.argmax().item()} / {split.argmax().item()} | {top2[0] - top2[1]:.3f} |")


if __name__ == "__main__":
    main()
