"""A long persona on the GPU with the defaults: a ~2,000-token system context, n = 64, 256 new
tokens each (issue 12, item 5), through `sample_rows` as `personas generate` runs it.

Prints the slots the engine chose, the prefix stored once, peak GPU memory and tokens/s.

    python benchmarks/long_persona.py [--system-tokens 2000] [--n 64] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    args = parser.parse_args()

    from personas.generate.request import Request, plan
    from personas.library.schema import Persona
    from personas.sampling.grid import Settings
    from personas.sampling.scheduler import engine_for

    model = load_checkpoint(args.checkpoint)
    words = "The shop sells mountain bikes, helmets, lights and repair kits to riders of every level. "
    system = words
    while len(model.tokenizer.encode(system)) < args.system_tokens:
        system += words
    persona = Persona(name="long", system=system, prompt="Tell me about your last ride.")
    settings = Settings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    rows = plan(Request(personas=[persona], temperatures=(1.0,), n=args.n, seed=1, settings=settings), model)
    torch.cuda.reset_peak_memory_stats()
    samples = []
    started = time.perf_counter()
    engine = engine_for(model, settings)  # what sample_rows builds for `personas generate`
    engine.submit(rows, settings, samples.append)
    engine.run()
    torch.cuda.synchronize()
    # One prompt: all of it but its last token is the shared prefix.
    seen = dict(slots=engine.slot_count, row=engine.positions_held // engine.rows_delivered,
                prefix=len(rows[0].prompt_ids) - 1)
    seconds = time.perf_counter() - started
    tokens = sum(len(s.token_ids) for s in samples)
    print(f"card: {torch.cuda.get_device_name()}; prompt {len(rows[0].prompt_ids)} tokens, n={args.n}, "
          f"{args.new_tokens} new tokens, default settings")
    print(f"slots {seen['slots']}, prefix stored once: {seen['prefix']} tokens (all but the last prompt token), own cache {seen['row']} positions per row; "
          f"{len(samples)} samples, {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s); "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB of "
          f"{torch.cuda.get_device_properties(0).total_memory / 1e9:.1f}")


if __name__ == "__main__":
    main()
