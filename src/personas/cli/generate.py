"""`personas generate`: flags in, the core's records out through a writer."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError, PipeClosed
from ..output import FORMATS, make_writer
from ..persona import find_library_file, load_library
from .feedback import Feedback
from .insight import Insight
from .loading import load
from .options import (AllowPickleOpt, DeviceOpt, FastPathOpt, FileOpt, GptqBackendOpt, ModelOpt, QuietOpt,
                      TemplateOpt, TrustRemoteCodeOpt, template_choice)

def generate(
    names: Annotated[Optional[list[str]], typer.Argument(
        help="Personas to run (default: all of them).", show_default=False)] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", help="A user message; repeat for several (default: each persona's own prompt).",
        show_default=False)] = None,
    prompts_file: Annotated[Optional[str], typer.Option(
        "--prompts-file", help="Prompts from a file ('-': stdin): one per line, or JSONL objects with "
        "prompt and optional persona, temperatures, n, seed, id.", show_default=False)] = None,
    temp: Annotated[Optional[list[float]], typer.Option(
        "--temp", "-t", help="A sampling temperature; repeat for several. 0 = greedy. "
        "Default: \\[defaults].temperatures, else 0.7.", show_default=False)] = None,
    n: Annotated[Optional[int], typer.Option(
        "-n", help="Samples per persona, prompt and temperature (default: \\[defaults].n, else 1).",
        show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", "-s", help="Base seed; the same seed repeats the same texts (default: random, printed).",
        min=0, show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", help="Most tokens per sample (default: \\[defaults].max_new_tokens, else 128).",
        show_default=False)] = None,
    min_new_tokens: Annotated[int, typer.Option(
        "--min-new-tokens", help="Forbid ending the turn before this many tokens.", min=0)] = 0,
    top_p: Annotated[Optional[float], typer.Option(
        "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this much probability.",
        show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Keep only the k most likely tokens (0 = off).", show_default=False)] = None,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="table | jsonl | json | csv (default: table on a terminal, else jsonl).",
        show_default=False)] = None,
    template: TemplateOpt = "auto",
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Most rows per generate call (default: 64 on the CPU, 256 on a GPU).",
        min=1, show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write results to this file instead of stdout (json/csv/table: "
        "atomically at the end; jsonl: each sample as it finishes).", dir_okay=False,
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="With --output FILE in jsonl and a fixed --seed: skip the samples already in "
        "FILE and append the rest.")] = False,
    truncate: Annotated[bool, typer.Option(
        "--truncate", help="Drop examples (oldest first) from a prompt too long for the model's "
        "context, and say so, instead of refusing it.")] = False,
    fast_path: FastPathOpt = True,
    stats_file: Annotated[Optional[Path], typer.Option(
        "--stats-file", help="Write each persona × prompt × temperature's diversity (distinct-1/-2, "
        "unique samples, mean tokens) to this file as a JSON array.", dir_okay=False,
        show_default=False)] = None,
    diverge: Annotated[bool, typer.Option(
        "--diverge", help="Show where each cell's samples first branch, and the tokens drawn there "
        "with their probabilities (after the table; with other formats, in --stats-file).")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw diversity against temperature into this PNG.", dir_okay=False,
        show_default=False)] = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    gptq_backend: GptqBackendOpt = "auto",
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Sample each persona's answer N times at each temperature, in one batched call."""
    from ..engine import default_model_spec, resolve_model
    from ..generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_N, DEFAULT_TEMPERATURES, Request
    from ..outfile import OutputFile
    from ..prompts_file import parse_prompts, read_source
    from ..sampling import Settings

    feedback = Feedback(quiet)
    fmt = fmt or ("table" if output is None and sys.stdout.isatty() else "jsonl")
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'", "choose one of: " + ", ".join(FORMATS))
    template_value = template_choice(template)

    library = load_library(find_library_file(file))
    defaults = library.defaults
    personas = [library.get(name) for name in names] if names else list(library.personas.values())
    specs = []
    if prompts_file is not None:
        if prompt:
            raise InputError("--prompt and --prompts-file cannot be combined", "choose one")
        specs = parse_prompts(*read_source(prompts_file), library, personas)
    request_kwargs = {}
    if seed is not None or defaults.seed is not None:
        request_kwargs["seed"] = seed if seed is not None else defaults.seed
    request = Request(
        personas=personas,
        prompts=prompt or [],
        temperatures=temp or defaults.temperatures or DEFAULT_TEMPERATURES,
        n=n if n is not None else (defaults.n or DEFAULT_N),
        settings=Settings(
            max_new_tokens=max_new_tokens if max_new_tokens is not None else (
                defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
            min_new_tokens=min_new_tokens,
            top_p=top_p if top_p is not None else defaults.top_p,
            top_k=top_k if top_k is not None else defaults.top_k,
            max_batch=batch_size,
            fast_path=fast_path,
        ),
        template=template_value,
        specs=specs,
        truncate=truncate,
        on_truncate=lambda name, dropped, length: feedback.warn(
            f"persona '{name}': dropped {dropped} example{'s' if dropped > 1 else ''} to fit the "
            f"model's context (prompt now {length} tokens)"),
        **request_kwargs,
    )
    if resume and (output is None or "seed" not in request_kwargs):
        raise InputError("--resume needs --output FILE and a fixed seed (--seed or [defaults].seed)",
                         "the samples already written are matched by their seeds")
    choice = resolve_model(default_model_spec(model, defaults.model))
    insight = Insight(stats_file, diverge, plot, fmt)
    insight.open(resume)
    target = OutputFile(output, fmt, resume) if output is not None else None
    try:
        _generate(request, choice, fmt, target, feedback, device, gptq_backend, allow_pickle,
                  trust_remote_code, seed is None and defaults.seed is None, insight)
    except BaseException as e:
        insight.abandon()
        if target is not None:
            target.abandon()
        if isinstance(e, BrokenPipeError):
            raise PipeClosed() from None
        raise
    if target is not None:
        target.commit()


def _generate(request, choice, fmt: str, target, feedback: Feedback, device, gptq_backend: str,
              allow_pickle: bool, trust_remote_code: bool, random_seed: bool, insight: Insight) -> None:
    from ..generation import CHUNK_ROWS, plan, sample_rows, to_record
    from ..outfile import finished_rows
    from ..record import resume_key

    out = target.stream if target is not None else sys.stdout
    if random_seed:
        feedback.info(f"seed {request.seed} (pass --seed {request.seed} to repeat this run)")

    # Libraries (gptqmodel's banner, for one) print to stdout; only our records may go there.
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load(choice, feedback, device=device, gptq_backend=gptq_backend, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, fast_path=request.settings.fast_path)
        if request.settings.max_batch is None:
            # A big grid (a prompts file) runs in chunks, so memory stays bounded.
            chunk = CHUNK_ROWS.get(loaded.device.type, CHUNK_ROWS["cpu"])
            request = replace(request, settings=replace(request.settings, max_batch=chunk))
        rows = plan(request, loaded)
        if target is not None and target.resumed:
            done = finished_rows(target.path)
            rows = [r for r in rows if resume_key(r.persona, r.prompt, r.temperature, r.sample, r.seed) not in done]
            feedback.info(f"resuming: {len(done)} samples already in {target.path}, {len(rows)} to go")
        chunks = -(-len(rows) // request.settings.max_batch) if rows else 0
        if chunks > 1:
            feedback.info(f"{len(rows)} samples in {chunks} batches of up to {request.settings.max_batch} rows")
        writer = make_writer(fmt, out, [(r.id, r.persona, r.prompt, r.temperature, r.sample) for r in rows],
                             list(request.temperatures))
        insight.order = [(r.persona, r.prompt, r.temperature) for r in rows]
        tokens = 0
        started = time.perf_counter()
        with feedback.generating(len(rows), request.settings.max_new_tokens) as (on_step, sample_done):
            def on_sample(sample) -> None:
                nonlocal tokens
                record = to_record(sample, loaded)
                tokens += record.new_tokens
                writer.add(record)
                insight.add(record, sample)
                sample_done()

            sample_rows(request.settings, loaded, rows, on_sample, on_step=on_step,
                        on_split=lambda size, half: feedback.warn(
                            f"out of memory with {size} rows in a batch; retrying in batches of {half}"))
        elapsed = time.perf_counter() - started
        writer.close()
        insight.finish(loaded, out, feedback, target.path if target is not None and target.resumed else None)
    feedback.info(f"{len(rows)} samples, {tokens} new tokens in {elapsed:.1f} s "
                  f"({tokens / elapsed if elapsed else 0:.0f} tokens/s)")
