"""`personas explain`: the next-token distribution after a persona's prompt, per temperature."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from ..library.load import find_library_file, load_library
from ..output.records import ReportFormat
from .feedback import Feedback
from .loading import load_model_for, model_options
from .options import (AllowPickleOpt, CpuWeights, CpuWeightsOpt, DeviceOpt, DryAllowedLengthOpt, DryBaseOpt,
                      DryBreakerOpt, DryMultiplierOpt, FileOpt, FrequencyPenaltyOpt, GptqBackend, GptqBackendOpt,
                      LogitBiasOpt, MinPOpt, ModelOpt, PresencePenaltyOpt, PromptOpt, QuietOpt, RepetitionPenaltyOpt,
                      Template, TemplateOpt, TrustRemoteCodeOpt, rules_from_flags)


def explain(
    name: Annotated[str, typer.Argument(help="The persona whose prompt is explained.", show_default=False)],
    prompt: PromptOpt = None,
    temp: Annotated[Optional[list[float]], typer.Option(
        "--temp", "-t", help="A temperature; repeat for several. 0 = greedy. Default: 0.2, 1.0, 1.5.",
        show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="How many of the likeliest tokens to show.", min=1)] = 10,
    steps: Annotated[int, typer.Option(
        "--steps", help="Also show this many further steps of one greedy continuation.", min=0)] = 5,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    frequency_penalty: FrequencyPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = None,
    logit_bias: LogitBiasOpt = None,
    dry_multiplier: DryMultiplierOpt = None,
    dry_base: DryBaseOpt = None,
    dry_allowed_length: DryAllowedLengthOpt = None,
    dry_sequence_breaker: DryBreakerOpt = None,
    fmt: Annotated[Optional[ReportFormat], typer.Option(
        "--format", "-f", help="Default: table on a terminal, else json.", show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Also draw the first token's probabilities per temperature into this PNG.",
        dir_okay=False, show_default=False)] = None,
    template: TemplateOpt = Template.AUTO,
    file: FileOpt = None,
    model: ModelOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    gptq_backend: GptqBackendOpt = GptqBackend.AUTO,
    cpu_weights: CpuWeightsOpt = CpuWeights.GGUF,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Show the model's next-token probabilities after a persona's prompt at each temperature."""
    from ..model.load import fit_dialog
    from ..model.prompt import Dialog
    from ..sampling.grid import check_temperature, resolve_rules, rules_from

    feedback = Feedback(quiet)
    flags = rules_from_flags(min_p, repetition_penalty, frequency_penalty, presence_penalty, logit_bias,
                             dry_multiplier, dry_base, dry_allowed_length, dry_sequence_breaker)
    fmt = fmt or (ReportFormat.TABLE if sys.stdout.isatty() else ReportFormat.JSON)
    temperatures = list(dict.fromkeys(temp or [0.2, 1.0, 1.5]))
    for t in temperatures:
        check_temperature(t)
    if plot is not None:
        from ..output.plots import check_plot_path

        check_plot_path(plot)
    library = load_library(find_library_file(file))
    persona = library.get(name)
    text = prompt if prompt is not None else persona.prompt
    if not text or not text.strip():
        raise InputError(f"persona '{name}' has no default prompt" if text is None else "the prompt is empty",
                         "pass --prompt TEXT")
    options = model_options(library.defaults, model, device, gptq_backend, allow_pickle, trust_remote_code,
                            fast_path=False, cpu_weights=cpu_weights, engine_only=False)
    loaded = load_model_for(options, feedback)
    with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout is for the report
        from ..diagnostics.distributions import explain as explain_prompt

        ids, _ = fit_dialog(Dialog.for_persona(persona, text), loaded, template.for_model(),
                            steps + 1, truncate=False, who=f"persona '{name}'")
        rules = resolve_rules(flags.over(rules_from(persona)).over(rules_from(library.defaults)), loaded.tokenizer)
        report = explain_prompt(loaded, ids, temperatures, top_k, steps, rules)
        if plot is not None:
            from ..output.plots import plot_next_token

            plot_next_token(report, plot, f"{name}, \u201c{text}\u201d ({loaded.label})")
            feedback.info(f"plot written to {plot}")
    if fmt == ReportFormat.JSON:
        sys.stdout.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    else:
        from ..output.diagnostics import write_explain_table

        after = " after min_p, the penalties, logit_bias and DRY" if rules is not None and rules.used else ""
        write_explain_table(sys.stdout, report, f"{name} · {text} · model {loaded.label} · softmax(logits / T) "
                            f"of the model's logits{after}; entropy over the whole vocabulary")
