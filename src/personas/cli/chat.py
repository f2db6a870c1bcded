"""`personas chat`: personas talking to each other, a line at a time."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, Optional

import typer

from ..dialogue.chat import Order
from ..errors import PipeClosed
from ..library.load import find_library_file, load_library
from ..output.transcripts import ChatFormat, LineJsonWriter, TranscriptWriter
from .feedback import Feedback, truncation_warning
from .loading import load_model_for, model_options
from .options import (AllowPickleOpt, CpuWeights, CpuWeightsOpt, DeviceOpt, DryAllowedLengthOpt, DryBaseOpt,
                      DryBreakerOpt, DryMultiplierOpt, FastPathOpt, FileOpt, FrequencyPenaltyOpt, GptqBackend,
                      GptqBackendOpt, LineTokensOpt, LogitBiasOpt, MinPOpt, ModelOpt, PresencePenaltyOpt, QuietOpt,
                      RepetitionPenaltyOpt, SeedOpt, Template, TemplateOpt, TopKOpt, TopPOpt, TrustRemoteCodeOpt,
                      rules_from_flags, sampling_settings, seed_in_force)


def chat(
    names: Annotated[list[str], typer.Argument(help="Two or more personas; the first speaks first.",
                                               show_default=False)],
    turns: Annotated[int, typer.Option("--turns", help="Lines to speak in all (an opener is not one).")] = 8,
    opener: Annotated[Optional[str], typer.Option(
        "--opener", help="A first line that everyone hears, e.g. a topic or a scene (default: the first "
        "persona's own opener, if one has one).", show_default=False)] = None,
    temp: Annotated[Optional[list[str]], typer.Option(
        "--temp", "-t", help="NAME=T for one persona, or T for all; repeatable. Default: the persona's "
        "temperature in TOML, else 0.7.", show_default=False)] = None,
    order: Annotated[Order, typer.Option("--order", help="round-robin (in the order named) or random.")] = Order.ROUND_ROBIN,
    seed: SeedOpt = None,
    max_new_tokens: LineTokensOpt = None,
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
    fmt: Annotated[Optional[ChatFormat], typer.Option(
        "--format", "-f", help="Default: transcript on a terminal, else jsonl.", show_default=False)] = None,
    template: TemplateOpt = Template.AUTO,
    fast_path: FastPathOpt = True,
    file: FileOpt = None,
    model: ModelOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    gptq_backend: GptqBackendOpt = GptqBackend.AUTO,
    cpu_weights: CpuWeightsOpt = CpuWeights.GGUF,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Let personas talk to each other, each from its own seat, one line at a time."""
    from ..dialogue.chat import chat_lines, chat_opener, chat_temperatures, check_chat
    from ..sampling.grid import validate_values

    feedback = Feedback(quiet)
    fmt = fmt or (ChatFormat.TRANSCRIPT if sys.stdout.isatty() else ChatFormat.JSONL)
    library = load_library(find_library_file(file))
    personas = [library.get(name) for name in names]
    check_chat(personas, turns, opener)
    opener = chat_opener(personas, opener)
    temperatures = chat_temperatures(personas, temp or [])
    rules = rules_from_flags(min_p, repetition_penalty, frequency_penalty, presence_penalty, logit_bias,
                             dry_multiplier, dry_base, dry_allowed_length, dry_sequence_breaker)
    settings = sampling_settings(library.defaults, max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k,
                                 fast_path=fast_path, rules=rules)
    validate_values(list(temperatures.values()), 1, settings)  # top-p/top-k are checked here
    options = model_options(library.defaults, model, device, gptq_backend, allow_pickle, trust_remote_code, fast_path,
                            cpu_weights=cpu_weights)
    base_seed = seed_in_force(seed, library.defaults)
    base_seed.announce(feedback)
    out = sys.stdout
    writer = TranscriptWriter(out, names) if fmt == ChatFormat.TRANSCRIPT else LineJsonWriter(out)
    try:
        loaded = load_model_for(options, feedback)
        with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout is for the transcript
            if opener:
                writer.opener(opener)
            lines = chat_lines(loaded, personas, temperatures, turns, base_seed.value, settings, opener=opener, order=order,
                               template=template.for_model(), on_truncate=truncation_warning(feedback))
            for number in range(1, turns + 1):
                with feedback.loading(f"line {number} of {turns}"):
                    line = next(lines)
                writer.add(line)
    except BrokenPipeError:
        raise PipeClosed() from None
