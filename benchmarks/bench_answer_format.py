"""Answer formats against free text, the same rows in one run: what a JSON schema costs a step.

Each job keeps every slot busy for a fixed number of decode steps — rows queued beyond the slots
refill them as answers end (a schema's answers end when their object closes; free rows run
exactly --new-tokens) — and counts the tokens chosen in those steps, so both sides decode the
same number of rows per step. The schema is the issue's nested one (a bounded string, a bounded
integer, an enum, an array of 1–3 strings, a nested object, no other keys), compact JSON.

    CPU (the embedded model): python benchmarks/bench_answer_format.py [--rows 64] [--steps 128]
    GPU: python benchmarks/bench_answer_format.py --model /tmp/personas-gptq --job bulk --job grid

`--whitespace` measures instead why JSON is compact by default: 64 random walks (uniform random
logits, the embedded model's tokenizer) through the nested schema, with llguidance's flexible
whitespace and without, counting the objects that close within 200 tokens.

Jobs: `cpu` (64 slots, distinct prompts to `customer`, T = 1.0), `bulk` (512 prompts × n = 2 at
T = 1.0, the engine's slots), `grid` (the 24-row grid: 24 slots, three temperatures). Free and
schema alternate, --repeats times; medians. Target: schema tokens/s ≥ 85% of free; on the grid,
at most +0.5 ms a step.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, log, machine, persona_rows, sync  # noqa: E402

NESTED = json.loads((REPO / "tests" / "data" / "nested.schema.json").read_text())  # the tests' schema too
JOBS = {  # slots (None: the engine's own), distinct prompts, samples each, temperatures
    "cpu": (64, 64, 1, (1.0,)),
    "bulk": (None, 512, 2, (1.0,)),
    "grid": (24, 1, 8, (0.2, 0.7, 1.0)),
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--job", action="append", choices=sorted(JOBS))
    parser.add_argument("--steps", type=int, default=128, help="decode steps measured per run")
    parser.add_argument("--warm-steps", type=int, default=4, help="steps before the clock starts (graph capture)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--whitespace", action="store_true", help="compact against flexible whitespace, on random logits")
    return parser.parse_args()


def rows_for(loaded, job: str, settings, schema: bool, steps: int, new_tokens: int):
    """The job's rows, repeated so the queue outlasts the measured steps even where answers end
    early (a schema's)."""
    slots, prompts, n, temperatures = JOBS[job]
    base = []
    for t in temperatures:
        base += persona_rows(loaded, prompts, t, settings, n=n)
    rounds = 1 + (steps // 16 if schema else steps // new_tokens)  # answers of ≥ 16 tokens
    rows = []
    for r in range(rounds):
        rows += [replace(row, sample=row.sample + r * n, seed=row.seed + 7919 * r) for row in base]
    return rows


def run(loaded, rows, settings, slots, steps: int, warm: int) -> dict:
    from personas.engine.engine import Engine
    from personas.engine.loop import engine_config

    config = replace(engine_config(loaded, settings), max_slots=slots)
    engine = Engine(loaded, config)
    chosen = 0
    finished = []

    def heard(_row, _token, _logprobs) -> None:
        nonlocal chosen
        chosen += 1

    engine.submit(rows, settings, finished.append, on_token=heard)
    with torch.inference_mode():
        for _ in range(warm):
            engine.step()
        sync()
        start_tokens, start_steps, start_rows = chosen, engine.stats.steps, engine.stats.rows_decoded
        started = time.perf_counter()
        while engine.stats.steps - start_steps < steps:
            engine.step()
        sync()
        seconds = time.perf_counter() - started
    taken = engine.stats.steps - start_steps
    result = {"seconds": seconds, "tokens": chosen - start_tokens, "steps": taken,
              "batch": (engine.stats.rows_decoded - start_rows) / taken, "finished": finished,
              "slots": engine.slot_count}
    # The next run's engine sizes its slots by the memory free then: this one's cache must be
    # given back first, not left in torch's caching allocator (on an 80 GB card the next engine
    # otherwise got a few dozen slots).
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def whitespace(loaded, walks: int = 64, limit: int = 200) -> None:
    """Random walks through the schema: how many objects close within `limit` tokens, compact
    against flexible whitespace."""
    import llguidance

    from personas.sampling.grammar import GrammarTokenizer, allow_only, byte_bias, words_for

    vocabulary = loaded.model.get_output_embeddings().weight.shape[0]
    grammar = GrammarTokenizer(loaded.tokenizer, vocabulary, loaded.eos_ids)
    print(f"\n{walks} random walks through the nested schema, at most {limit} tokens, tokenizer of {loaded.label}\n")
    print("| whitespace | objects closed | median tokens of those |")
    print("|---|---:|---:|")
    for flexible in (True, False):
        text = llguidance.LLMatcher.grammar_from_json_schema(NESTED, defaults={"whitespace_flexible": flexible})
        matchers = [llguidance.LLMatcher(grammar.tokenizer, text) for _ in range(walks)]
        bitmask = torch.full((walks, words_for(vocabulary)), -1, dtype=torch.int32)
        generator = torch.Generator().manual_seed(0)
        lengths, live = {}, set(range(walks))
        for step in range(limit):
            grammar.fill([(matchers[i], i) for i in live], bitmask)
            chosen = allow_only(torch.rand(walks, vocabulary, generator=generator), bitmask,
                                byte_bias(torch.device("cpu"))).argmax(-1).tolist()
            for i in list(live):
                if chosen[i] in loaded.eos_ids or (matchers[i].consume_token(chosen[i]) and matchers[i].is_stopped()):
                    lengths[i] = step + 1
                    live.discard(i)
            if not live:
                break
        closed = sorted(lengths.values())
        print(f"| {'flexible' if flexible else 'compact (the default)'} | {len(closed)} of {walks} | "
              f"{statistics.median(closed) if closed else '—'} |")


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    from personas.library.answer_format import AnswerFormat, checked
    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.sampling.grid import Rules, Settings

    log(f"loading {args.model}")
    loaded = load_model(resolve_model(args.model))
    on = loaded.model.device.type
    if args.whitespace:
        whitespace(loaded)
        return
    jobs = args.job or (["cpu"] if on == "cpu" else ["bulk", "grid"])
    schema_format = checked(AnswerFormat.json_schema(NESTED))
    free = Settings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    shaped = Settings(max_new_tokens=args.new_tokens, rules=Rules(answer_format=schema_format))
    results = {}
    for job in jobs:
        slots = JOBS[job][0]
        runs = {"free": [], "schema": []}
        rows = {"free": rows_for(loaded, job, free, False, args.steps, args.new_tokens),
                "schema": rows_for(loaded, job, shaped, True, args.steps, args.new_tokens)}
        for repeat in range(args.repeats):
            for kind, settings in (("free", free), ("schema", shaped)):
                result = run(loaded, rows[kind], settings, slots, args.steps, args.warm_steps)
                runs[kind].append(result)
                log(f"{job} {kind} #{repeat + 1}: {result['tokens'] / result['seconds']:,.0f} tokens/s, "
                    f"{1000 * result['seconds'] / result['steps']:.2f} ms/step, {result['batch']:.1f} rows/step")
        valid = 0
        done = [s for r in runs["schema"] for s in r["finished"] if s.finish_reason == "stop"]
        for sample in done:
            try:
                import jsonschema

                jsonschema.validate(json.loads(loaded.decode(list(sample.token_ids))), NESTED)
                valid += 1
            except ImportError:
                valid = -1
                break
            except Exception:
                pass
        results[job] = {kind: {"tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rs),
                               "ms_per_step": statistics.median(1000 * r["seconds"] / r["steps"] for r in rs),
                               "rows_per_step": statistics.median(r["batch"] for r in rs), "slots": rs[0]["slots"]}
                        for kind, rs in runs.items()}
        results[job]["valid"] = (valid, len(done))
    print(f"\nmachine: {machine()}; torch {torch.__version__}; model {loaded.label} on {on}")
    print(f"each run: {args.steps} decode steps after {args.warm_steps} unmeasured, slots kept busy from a queue; "
          f"free rows exactly {args.new_tokens} tokens; medians of {args.repeats}, alternating\n")
    print("| job | slots | free: tokens/s | schema: tokens/s | schema / free | free: ms/step | schema: ms/step "
          "| + ms/step | rows/step (free, schema) | schema answers valid |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for job, r in results.items():
        f, s = r["free"], r["schema"]
        valid, total = r["valid"]
        print(f"| {job} | {f['slots']} | {f['tokens_per_s']:,.0f} | {s['tokens_per_s']:,.0f} | "
              f"{s['tokens_per_s'] / f['tokens_per_s']:.0%} | {f['ms_per_step']:.2f} | {s['ms_per_step']:.2f} | "
              f"{s['ms_per_step'] - f['ms_per_step']:+.2f} | {f['rows_per_step']:.1f}, {s['rows_per_step']:.1f} | "
              f"{'(jsonschema missing)' if valid < 0 else f'{valid} of {total}'} |")
    print("\ntarget: schema tokens/s ≥ 85% of free; the grid's step at most +0.5 ms")
    if args.out:
        args.out.write_text(json.dumps({job: {k: v for k, v in r.items()} for job, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
