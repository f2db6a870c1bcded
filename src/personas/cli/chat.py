"""`personas chat` and `personas play`: personas talking, and personas playing games."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError, PipeClosed
from ..persona import Library, find_library_file, load_library
from .feedback import Feedback
from .loading import load
from .options import (AllowPickleOpt, DeviceOpt, FastPathOpt, FileOpt, GptqBackendOpt, ModelOpt, QuietOpt,
                      TemplateOpt, TrustRemoteCodeOpt, template_choice)

SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", "-s", help="Base seed; the same seed repeats the same run (default: \\[defaults].seed, else "
    "random, printed).", min=0, show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this much probability "
    "(default: \\[defaults].top_p, else off).", show_default=False)]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", help="Keep only the k most likely tokens (default: \\[defaults].top_k, else off).",
    show_default=False)]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", help="Most tokens per line (default: the game's, \\[defaults].max_new_tokens, else 128).",
    min=1, show_default=False)]


def chat(
    names: Annotated[list[str], typer.Argument(help="Two or more personas; the first speaks first.",
                                               show_default=False)],
    turns: Annotated[int, typer.Option("--turns", help="Lines to speak in all (an opener is not one).")] = 8,
    opener: Annotated[Optional[str], typer.Option(
        "--opener", help="A first line that everyone hears, e.g. a topic or a scene.", show_default=False)] = None,
    temp: Annotated[Optional[list[str]], typer.Option(
        "--temp", "-t", help="NAME=T for one persona, or T for all; repeatable. Default: the persona's "
        "temperature in TOML, else 0.7.", show_default=False)] = None,
    order: Annotated[str, typer.Option("--order", help="round-robin (in the order named) or random.")] = "round-robin",
    seed: SeedOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="transcript | jsonl (default: transcript on a terminal, else jsonl).",
        show_default=False)] = None,
    template: TemplateOpt = "auto",
    fast_path: FastPathOpt = True,
    file: FileOpt = None,
    model: ModelOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    gptq_backend: GptqBackendOpt = "auto",
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Let personas talk to each other, each from its own seat, one line at a time."""
    from ..chat import ORDERS, chat_lines, chat_temperatures, check_chat
    from ..generation import validate_values
    from ..transcript_output import CHAT_FORMATS, LineJsonWriter, TranscriptWriter

    feedback = Feedback(quiet)
    fmt = _choose(fmt or ("transcript" if sys.stdout.isatty() else "jsonl"), CHAT_FORMATS, "format")
    _choose(order, ORDERS, "order")
    template_value = template_choice(template)
    library = load_library(find_library_file(file))
    personas = [library.get(name) for name in names]
    check_chat(personas, turns, opener)
    temperatures = chat_temperatures(personas, temp or [])
    settings = _settings(library, max_new_tokens, None, top_p, top_k, fast_path)
    validate_values(list(temperatures.values()), 1, settings)  # top-p/top-k are checked here
    seed = _seed(seed, library, feedback)
    out = sys.stdout
    writer = TranscriptWriter(out, names) if fmt == "transcript" else LineJsonWriter(out)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            loaded = _load(library, model, feedback, device, gptq_backend, allow_pickle, trust_remote_code, fast_path)
            if opener:
                writer.opener(opener)
            lines = chat_lines(loaded, personas, temperatures, turns, seed, settings, opener=opener, order=order,
                               template=template_value, on_truncate=_truncation_warning(feedback))
            for number in range(1, turns + 1):
                with feedback.loading(f"line {number} of {turns}"):
                    line = next(lines)
                writer.add(line)
    except BrokenPipeError:
        raise PipeClosed() from None


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
    max_new_tokens: MaxNewTokensOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="table | json (default: table on a terminal, else json).",
        show_default=False)] = None,
    transcripts: Annotated[Optional[Path], typer.Option(
        "--transcripts", help="Also write every episode to this file, one JSON object per line, "
        "each as soon as it ends (an interrupted run keeps the finished ones).",
        dir_okay=False, show_default=False)] = None,
    template: TemplateOpt = "auto",
    fast_path: FastPathOpt = True,
    file: FileOpt = None,
    model: ModelOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    gptq_backend: GptqBackendOpt = "auto",
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Play N episodes of a game per temperature, all advancing together; report win rates."""
    from ..generation import CHUNK_ROWS, validate_values
    from ..outfile import OutputFile
    from ..play import episode_dict, episode_seeds, play_episodes, summarize
    from ..transcript_output import PLAY_FORMATS, write_play_json, write_play_table

    feedback = Feedback(quiet)
    fmt = _choose(fmt or ("table" if sys.stdout.isatty() else "json"), PLAY_FORMATS, "format")
    template_value = template_choice(template)
    library = load_library(find_library_file(file))
    chosen = library.game(game)
    temperatures = list(dict.fromkeys(temp or library.defaults.temperatures or [0.7]))
    settings = _settings(library, max_new_tokens, chosen.max_new_tokens, top_p, top_k, fast_path)
    validate_values(temperatures, n, settings)
    target = OutputFile(transcripts, "jsonl") if transcripts is not None else None
    if episode_seed is not None:
        seeds = [episode_seed]
    else:
        seeds = episode_seeds(_seed(seed, library, feedback), chosen.name, n)

    def keep(episode) -> None:
        if target is not None:
            target.stream.write(json.dumps(episode_dict(episode), ensure_ascii=False) + "\n")
            target.stream.flush()

    cap = max_turns or chosen.max_turns
    try:
        with contextlib.redirect_stdout(sys.stderr):
            loaded = _load(library, model, feedback, device, gptq_backend, allow_pickle, trust_remote_code, fast_path)
            if settings.max_batch is None:
                settings = replace(settings, max_batch=CHUNK_ROWS.get(loaded.device.type, CHUNK_ROWS["cpu"]))
            feedback.info(f"{len(seeds) * len(temperatures)} episodes of {chosen.name}, up to {cap} turns, "
                          "one batched generate per turn")
            with feedback.playing(cap, settings.max_new_tokens) as (on_turn, on_step):
                episodes = play_episodes(loaded, chosen, library.personas, temperatures, seeds, settings,
                                         max_turns=max_turns, template=template_value, on_turn=on_turn,
                                         on_truncate=_truncation_warning(feedback), on_step=on_step,
                                         on_end=keep)
        if target is not None:
            target.commit()
        summaries = summarize(chosen, episodes)
        if fmt == "json":
            write_play_json(sys.stdout, summaries)
        else:
            write_play_table(sys.stdout, chosen.name, chosen.scored_side, summaries)
    except BaseException as e:
        if target is not None:
            target.abandon()
        if isinstance(e, BrokenPipeError):
            raise PipeClosed() from None
        raise


# --- shared by both ----------------------------------------------------------------------------


def _choose(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise InputError(f"unknown {what} '{value}'", "choose one of: " + ", ".join(choices))
    return value


def _seed(seed: int | None, library: Library, feedback: Feedback) -> int:
    if seed is not None:
        return seed
    if library.defaults.seed is not None:
        return library.defaults.seed
    seed = secrets.randbelow(2**31)
    feedback.info(f"seed {seed} (pass --seed {seed} to repeat this run)")
    return seed


def _settings(library: Library, max_new_tokens: int | None, game_default: int | None, top_p: float | None,
              top_k: int | None, fast_path: bool):
    from ..generation import DEFAULT_MAX_NEW_TOKENS
    from ..sampling import Settings

    d = library.defaults
    return Settings(max_new_tokens=max_new_tokens or game_default or d.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                    top_p=top_p if top_p is not None else d.top_p, top_k=top_k if top_k is not None else d.top_k,
                    fast_path=fast_path)


def _load(library: Library, model: str | None, feedback: Feedback, device, gptq_backend: str, allow_pickle: bool,
          trust_remote_code: bool, fast_path: bool):
    from ..engine import default_model_spec, resolve_model

    choice = resolve_model(default_model_spec(model, library.defaults.model))
    return load(choice, feedback, device=device, gptq_backend=gptq_backend, allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code, fast_path=fast_path)


def _truncation_warning(feedback: Feedback):
    warned: set[str] = set()

    def warn(who: str, dropped: int) -> None:
        if who not in warned:  # once per speaker: a long chat would otherwise warn every turn
            warned.add(who)
            feedback.warn(f"{who}'s prompt no longer fits the model's context: the oldest exchanges "
                          f"are dropped from it ({dropped} so far)")
    return warn
