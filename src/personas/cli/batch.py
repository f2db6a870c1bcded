"""`personas batch INPUT`: an OpenAI Batch API file answered on the decode engine."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError, PersonasError, PipeClosed
from ..library.load import find_library_file, load_library
from ..output.batch import BatchFormat, batch_writer
from ..sampling.grid import Settings
from .feedback import Feedback
from .loading import load_here_or_on_ray, model_options
from .options import (AllowPickleOpt, BatchSizeOpt, CpuWeights, CpuWeightsOpt, DenseWeightsOpt, DeviceOpt,
                      FastPathOpt, FileOpt, GptqBackend, GptqBackendOpt, ModelOpt, QuietOpt, RayOpt, RayWorkersOpt,
                      TrustRemoteCodeOpt, check_ray)


def batch(
    source: Annotated[str, typer.Argument(
        metavar="INPUT", help="The batch file ('-': stdin): one OpenAI Batch API request per line, "
        "{\"custom_id\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\"}.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the output lines to this file (each as its request completes) "
        "instead of stdout.", dir_okay=False, show_default=False)] = None,
    fmt: Annotated[BatchFormat, typer.Option(
        "--format", "-f", help="jsonl: OpenAI's batch output, each line as its request completes; parquet: "
        "one typed row per request, written whole to --output when the run ends.")] = BatchFormat.JSONL,
    resume: Annotated[bool, typer.Option(
        "--resume", help="With --output FILE: skip the requests whose custom_id FILE already answers, "
        "and append the rest.")] = False,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", "-s", help="Seed for requests whose body names none (default: a fresh one per request, "
        "as serve --http draws it).", min=0, show_default=False)] = None,
    ray_address: RayOpt = None,
    ray_workers: RayWorkersOpt = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    gptq_backend: GptqBackendOpt = GptqBackend.AUTO,
    cpu_weights: CpuWeightsOpt = CpuWeights.GGUF,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = None,
    fast_path: FastPathOpt = True,
    gptq_dense: DenseWeightsOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Answer an OpenAI batch file: each line's chat completion, as OpenAI's batch output writes it.

    A body's model is a persona, or 'base' for its own messages as they stand (the system message
    is the persona). A request refused on its own merits gets its error as its output line and
    the others run; the exit status is then 1.
    """
    from ..output.files import OutputFile, answered_ids
    from ..serve.batch import check_file

    feedback = Feedback(quiet)
    if resume and output is None:
        raise InputError("--resume needs --output FILE", "the requests already answered are read from FILE")
    if fmt == BatchFormat.PARQUET and output is None:
        raise InputError("--format parquet writes a binary file", "pass --output FILE.parquet")
    check_ray(ray_address, ray_workers)
    library = load_library(find_library_file(file))
    with _readable(source) as (path, name):
        target = OutputFile(output, fmt.value, resume and output.exists()) if output is not None else None
        done = answered_ids(output) if target is not None and target.resumed else set()
        checked = check_file(path, name, done)  # every envelope, before the model loads
        if not checked.requests and not done:
            raise InputError(f"no requests in {name}", "write one batch request per line")
        if done:
            feedback.info(f"resuming: {len(done)} requests already answered in {output}, {checked.requests} to go")
            if not checked.requests:
                target.commit()
                return
        options = model_options(library.defaults, model, device, gptq_backend, allow_pickle, trust_remote_code,
                                fast_path, cpu_weights=cpu_weights, on_ray=ray_address is not None)
        settings = Settings(max_batch=batch_size, fast_path=fast_path, dense_weights=gptq_dense)
        try:
            summary = _run(path, name, library, options, settings, seed, done, target, fmt, feedback,
                           checked.rows, ray_address, ray_workers)
        except BaseException as e:
            if target is not None:
                target.abandon()
            if isinstance(e, BrokenPipeError):
                raise PipeClosed() from None
            raise
        if target is not None:
            target.commit()
    if summary.refused:
        lines = ", ".join(str(n) for n in summary.refused[:10]) + (", …" if len(summary.refused) > 10 else "")
        where = output if output is not None else "the output"
        one = len(summary.refused) == 1
        raise PersonasError(f"{len(summary.refused)} of {checked.requests} requests {'was' if one else 'were'} refused "
                            f"({'line' if one else 'lines'} {lines} of {name})",
                            f"{'its error line is' if one else 'their error lines are'} in {where}")


@contextlib.contextmanager
def _readable(source: str):
    """(a path that can be read twice, its name for messages): stdin is kept in a temporary file."""
    if source != "-":
        path = Path(source)
        if not path.is_file():
            raise InputError(f"cannot read batch file {source}: no such file", "check the path")
        yield path, source
        return
    with tempfile.NamedTemporaryFile(prefix="personas-batch-", suffix=".jsonl") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        yield Path(spool.name), "<stdin>"


def _run(path, name, library, options, settings, seed, done, target, fmt, feedback, total_rows, ray_address,
         ray_workers):
    writer = batch_writer(fmt, target.stream if target is not None else sys.stdout)
    with contextlib.ExitStack() as stack:
        loaded, pool = load_here_or_on_ray(stack, options, feedback, ray_address, ray_workers)
        return _answer(path, name, library, loaded, pool, settings, seed, done, writer, feedback, total_rows)


def _answer(path, name, library, loaded, pool, settings, seed, done, writer, feedback, total_rows):
    """The requests answered on this process's engine, or on the Ray pool's workers."""
    from ..engine.loop import engine_for
    from ..serve.batch import BatchRun, requests

    with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout is for the answers
        engine = None
        if pool is None:
            engine = engine_for(loaded, settings, expect_more=True)
            if engine is None:
                from ..engine.decoder import unsupported_reason

                raise InputError(f"batch runs on the decode engine, and {unsupported_reason(loaded.model)}",
                                 "run it with --ray local (its workers sample any model), or choose a Llama, "
                                 "Mistral or Qwen model")
        started = time.perf_counter()
        with feedback.generating(total_rows, None) as (_, row_done):
            if engine is not None:
                run = BatchRun(loaded, library, engine, writer.add, seed=seed, on_row=row_done)
                summary = run.run(requests(path, name, done))
            else:
                # Enough rows a round for every worker twice over at its batch size.
                rows = 2 * len(pool.actors) * pool.batch_rows(settings)
                run = BatchRun(loaded, library, None, writer.add, seed=seed, queue_rows=rows, on_row=row_done)
                summary = run.run_on(requests(path, name, done), pool)
        elapsed = time.perf_counter() - started
        writer.close()
    feedback.info(f"{summary.answered} requests answered, {len(summary.refused)} refused; {summary.rows} rows, "
                  f"{summary.tokens} new tokens in {elapsed:.1f} s "
                  f"({summary.tokens / elapsed if elapsed else 0:.0f} tokens/s)")
    return summary
