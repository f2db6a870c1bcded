"""`personas play`: many episodes of a game, advanced together, and their win rates."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import PipeClosed
from ..library.load import find_library_file, load_library
from ..output.records import ReportFormat
from .feedback import Feedback, truncation_warning
from .loading import load_model_for, model_options
from .options import (AllowPickleOpt, CpuWeights, CpuWeightsOpt, DeviceOpt, DryAllowedLengthOpt, DryBaseOpt,
                      DryBreakerOpt, DryMultiplierOpt, FastPathOpt, FileOpt, FrequencyPenaltyOpt, GptqBackend,
                      GptqBackendOpt, LineTokensOpt, LogitBiasOpt, MinPOpt, ModelOpt, PresencePenaltyOpt, QuietOpt,
                      RepetitionPenaltyOpt, SeedOpt, Template, TemplateOpt, TopKOpt, TopPOpt, TrustRemoteCodeOpt,
                      rules_from_flags, sampling_settings, seed_in_force)


def play(
    game: Annotated[str, typer.Argument(help="A game from the persona file's \\[games].", show_default=False)],
    temp: Annotated[Optional[list[float]], typer.Option(
        "--temp", "-t", help="A temperature for every player; repeat for several. Default: "
        "\\[defaults].temperatures, else 0.7.", show_default=False)] = None,
    n: Annotated[int, typer.Option("-n", help="Episodes per temperature.", min=1)] = 10,
    max_turns: Annotated[Optional[int], typer.Option(
        "--max-turns", help="Turn cap (default: the game's max_turns).", min=1, show_default=False)] = None,
    episode_seed: Annotated[Optional[int], typer.Option(
        "--episode-seed", help="Replay one episode from the seed a report printed (instead of -n).",
        min=0, show_default=False)] = None,
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
    fmt: Annotated[Optional[ReportFormat], typer.Option(
        "--format", "-f", help="Default: table on a terminal, else json.", show_default=False)] = None,
    transcripts: Annotated[Optional[Path], typer.Option(
        "--transcripts", help="Also write every episode to this file, one JSON object per line, "
        "each as soon as it ends (an interrupted run keeps the finished ones).",
        dir_okay=False, show_default=False)] = None,
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
    """Play N episodes of a game per temperature, all advancing together; report win rates."""
    from ..dialogue.play import episode_seeds, play_episodes, summarize
    from ..output.files import OutputFile
    from ..output.transcripts import episode_dict, write_play_json, write_play_table
    from ..sampling.grid import validate_values

    feedback = Feedback(quiet)
    fmt = fmt or (ReportFormat.TABLE if sys.stdout.isatty() else ReportFormat.JSON)
    library = load_library(find_library_file(file))
    chosen = library.game(game)
    temperatures = list(dict.fromkeys(library.defaults.pick("temperatures", temp)))
    rules = rules_from_flags(min_p, repetition_penalty, frequency_penalty, presence_penalty, logit_bias,
                             dry_multiplier, dry_base, dry_allowed_length, dry_sequence_breaker)
    settings = sampling_settings(library.defaults, max_new_tokens=max_new_tokens or chosen.max_new_tokens,
                                 top_p=top_p, top_k=top_k, fast_path=fast_path, rules=rules)
    validate_values(temperatures, n, settings)
    options = model_options(library.defaults, model, device, gptq_backend, allow_pickle, trust_remote_code, fast_path,
                            cpu_weights=cpu_weights)
    target = OutputFile(transcripts, "jsonl") if transcripts is not None else None
    if episode_seed is not None:
        seeds = [episode_seed]
    else:
        base_seed = seed_in_force(seed, library.defaults)
        base_seed.announce(feedback)
        seeds = episode_seeds(base_seed.value, chosen.name, n)

    def keep(episode) -> None:
        if target is not None:
            target.stream.write(json.dumps(episode_dict(episode), ensure_ascii=False) + "\n")
            target.stream.flush()

    cap = max_turns or chosen.max_turns
    try:
        loaded = load_model_for(options, feedback)
        feedback.info(f"{len(seeds) * len(temperatures)} episodes of {chosen.name}, up to {cap} turns, "
                      "one batched generate per turn")
        # Libraries may print; stdout is for the report.
        with contextlib.redirect_stdout(sys.stderr), feedback.playing(cap, settings.max_new_tokens) as (on_turn, on_step):
            episodes = play_episodes(loaded, chosen, library.personas, temperatures, seeds, settings,
                                     max_turns=max_turns, template=template.for_model(), on_turn=on_turn,
                                     on_truncate=truncation_warning(feedback), on_step=on_step, on_end=keep)
        if target is not None:
            target.commit()
        summaries = summarize(chosen, episodes)
        if fmt == ReportFormat.JSON:
            write_play_json(sys.stdout, summaries)
        else:
            write_play_table(sys.stdout, chosen.name, chosen.scored_side, summaries)
    except BaseException as e:
        if target is not None:
            target.abandon()
        if isinstance(e, BrokenPipeError):
            raise PipeClosed() from None
        raise
