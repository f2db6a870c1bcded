"""`personas generate`: flags in, the core's records out through a writer."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError, PipeClosed
from ..library.load import find_library_file, load_library
from ..output.records import SampleFormat, make_writer
from .diagnostics import Diagnostics
from .feedback import Feedback
from .loading import ModelOptions, load_here_or_on_ray, model_options
from .options import (AllowPickleOpt, BatchSizeOpt, CpuWeights, CpuWeightsOpt, DenseWeightsOpt, DeviceOpt,
                      DryAllowedLengthOpt, DryBaseOpt, DryBreakerOpt, DryMultiplierOpt, FastPathOpt, FileOpt,
                      FrequencyPenaltyOpt, GptqBackend, GptqBackendOpt, GrammarOpt, JsonOpt, JsonSchemaOpt,
                      LogitBiasOpt, MinPOpt, ModelOpt, PresencePenaltyOpt, QuietOpt, RayOpt, RayWorkersOpt, RegexOpt,
                      RepetitionPenaltyOpt, SeedOpt, Template, TemplateOpt, TopKOpt, TopPOpt, TrustRemoteCodeOpt,
                      answer_format_from_flags, check_ray, rules_from_flags, sampling_settings, seed_in_force)


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
    seed: SeedOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", help="Most tokens per sample (default: \\[defaults].max_new_tokens, else 128).",
        show_default=False)] = None,
    min_new_tokens: Annotated[int, typer.Option(
        "--min-new-tokens", help="Forbid ending the turn before this many tokens.", min=0)] = 0,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    frequency_penalty: FrequencyPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = None,
    logit_bias: LogitBiasOpt = None,
    dry_multiplier: DryMultiplierOpt = None,
    dry_base: DryBaseOpt = None,
    dry_allowed_length: DryAllowedLengthOpt = None,
    dry_sequence_breaker: DryBreakerOpt = None,
    json_schema: JsonSchemaOpt = None,
    json_object: JsonOpt = False,
    regex: RegexOpt = None,
    grammar: GrammarOpt = None,
    fmt: Annotated[Optional[SampleFormat], typer.Option(
        "--format", "-f", help="Default: table on a terminal, else jsonl (parquet: with --output).",
        show_default=False)] = None,
    template: TemplateOpt = Template.AUTO,
    batch_size: BatchSizeOpt = None,
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
    gptq_dense: DenseWeightsOpt = None,
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
    ray_address: RayOpt = None,
    ray_workers: RayWorkersOpt = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    gptq_backend: GptqBackendOpt = GptqBackend.AUTO,
    cpu_weights: CpuWeightsOpt = CpuWeights.GGUF,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Sample each persona's answer N times at each temperature, all rows decoding together."""
    from ..generate.prompts_file import parse_prompts, read_source
    from ..generate.request import Request
    from ..output.files import OutputFile
    feedback = Feedback(quiet)
    rules = rules_from_flags(min_p, repetition_penalty, frequency_penalty, presence_penalty, logit_bias,
                             dry_multiplier, dry_base, dry_allowed_length, dry_sequence_breaker,
                             answer_format_from_flags(json_schema, json_object, regex, grammar))
    fmt = fmt or (SampleFormat.TABLE if output is None and sys.stdout.isatty() else SampleFormat.JSONL)
    if fmt == SampleFormat.PARQUET and output is None:
        raise InputError("--format parquet writes a binary file", "pass --output FILE.parquet")
    check_ray(ray_address, ray_workers)
    if ray_address is not None and diverge:
        raise InputError("--diverge cannot be combined with --ray", "it reads the model's logits in this process")
    library = load_library(find_library_file(file))
    defaults = library.defaults
    personas = [library.get(name) for name in names] if names else list(library.personas.values())
    cells = []
    if prompts_file is not None:
        if prompt:
            raise InputError("--prompt and --prompts-file cannot be combined", "choose one")
        cells = parse_prompts(*read_source(prompts_file), library, personas)
    base_seed = seed_in_force(seed, defaults)
    request = Request(
        personas=personas,
        prompts=prompt or [],
        cells=cells,
        temperatures=defaults.pick("temperatures", temp),
        n=defaults.pick("n", n),
        seed=base_seed.value,
        settings=sampling_settings(defaults, max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k,
                                   min_new_tokens=min_new_tokens, batch_size=batch_size, fast_path=fast_path,
                                   dense_weights=gptq_dense, rules=rules),
        template=template.for_model(),
        truncate=truncate,
        on_truncate=lambda name, dropped, length: feedback.warn(
            f"persona '{name}': dropped {dropped} example{'s' if dropped > 1 else ''} to fit the "
            f"model's context (prompt now {length} tokens)"),
    )
    if resume and (output is None or base_seed.random):
        raise InputError("--resume needs --output FILE and a fixed seed (--seed or [defaults].seed)",
                         "the samples already written are matched by their seeds")
    # --diverge reads the model's logits through transformers' forward (diagnostics/diverge.py).
    options = model_options(defaults, model, device, gptq_backend, allow_pickle, trust_remote_code, fast_path,
                            cpu_weights=cpu_weights, engine_only=not diverge, on_ray=ray_address is not None)
    diagnostics = Diagnostics(stats_file, diverge, plot, fmt)
    diagnostics.open(resume)
    target = OutputFile(output, fmt, resume) if output is not None else None
    base_seed.announce(feedback)
    try:
        _generate(request, options, fmt, target, feedback, diagnostics, ray_address, ray_workers)
    except BaseException as e:
        diagnostics.abandon()
        if target is not None:
            target.abandon()
        if isinstance(e, BrokenPipeError):
            raise PipeClosed() from None
        raise
    if target is not None:
        target.commit()


def _generate(request, options: ModelOptions, fmt: SampleFormat, target, feedback: Feedback,
              diagnostics: Diagnostics, ray_address: str | None, ray_workers: int | None) -> None:
    out = target.stream if target is not None else sys.stdout
    with contextlib.ExitStack() as stack:
        # With Ray the workers hold the model; this process plans the rows while they load it.
        loaded, pool = load_here_or_on_ray(stack, options, feedback, ray_address, ray_workers)
        _sample_and_write(request, loaded, pool, fmt, target, out, feedback, diagnostics)


def _sample_and_write(request, loaded, pool, fmt: SampleFormat, target, out, feedback: Feedback,
                      diagnostics: Diagnostics) -> None:
    from ..generate.request import plan, to_record
    from ..output.files import finished_rows
    from ..record import resume_key
    from ..engine.loop import sample_rows

    # Libraries print to stdout now and then; only our records may go there.
    with contextlib.redirect_stdout(sys.stderr):
        rows = plan(request, loaded)
        if target is not None and target.resumed:
            done = finished_rows(target.path)
            rows = [r for r in rows if resume_key(r.persona, r.prompt, r.temperature, r.sample, r.seed) not in done]
            feedback.info(f"resuming: {len(done)} samples already in {target.path}, {len(rows)} to go")
        writer = make_writer(fmt, out, [(r.id, r.persona, r.prompt, r.temperature, r.sample) for r in rows],
                             list(request.temperatures))
        diagnostics.order = [(r.persona, r.prompt, r.temperature) for r in rows]
        tokens = 0
        started = time.perf_counter()
        # The engine refills slots as rows end, so decode steps are no measure of the whole job:
        # the bar counts finished samples.
        with feedback.generating(len(rows), None) as (on_step, sample_done):
            def on_sample(sample) -> None:
                nonlocal tokens
                record = to_record(sample, loaded)
                tokens += record.new_tokens
                writer.add(record)
                diagnostics.add(record, sample)
                sample_done()

            stats = None
            if pool is not None:
                pool.sample([(request.settings, rows)], on_sample)
            else:
                stats = sample_rows(request.settings, loaded, rows, on_sample, on_step=on_step,
                                    on_split=lambda size, half: feedback.warn(
                                        f"out of memory with {size} rows decoding at once; going on with {half}"),
                                    on_dense=lambda made: feedback.info(
                                        f"keeping half-precision copies of the GPTQ weights ({made / 1e9:.1f} GB) "
                                        "for steps of 256 rows or more (--no-gptq-dense: never)") if made else
                                    feedback.warn("out of memory: the half-precision copies of the GPTQ weights are "
                                                  "dropped; going on with the 4-bit kernel"))
        elapsed = time.perf_counter() - started
        writer.close()
        diagnostics.finish(loaded, out, feedback, target.path if target is not None and target.resumed else None)
    # The prompts' passes apart, and the decode steps' own speed after them: the figure peers
    # report as their generation speed (docs/performance.md, against llama.cpp).
    prompts = ""
    if stats is not None and stats.steps and elapsed > stats.prompt_seconds:
        prompts = (f"; prompts {stats.prompt_seconds:.2f} s, then "
                   f"{stats.rows_decoded / (elapsed - stats.prompt_seconds):.1f} tokens/s")
    feedback.info(f"{len(rows)} samples, {tokens} new tokens in {elapsed:.2f} s "
                  f"({tokens / elapsed if elapsed else 0:.0f} tokens/s{prompts})")
