"""What the commands share: option aliases (a flag reads the same everywhere), the enums behind
the choice options, and the one place where a flag falls back to `[defaults]`.

Every import here is free of torch: Typer builds every command's options for `--help`.
"""

from __future__ import annotations

import enum
import importlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from ..library.answer_format import AnswerFormat, checked, from_schema
from ..library.schema import Defaults
from ..model.gptq import GPTQ_BACKENDS
from ..sampling.grid import NO_RULES, Rules, Settings, check_rules, rules_from, token_key
from .feedback import Feedback


class Template(enum.StrEnum):
    """--template: the prompt format."""

    AUTO = "auto"  # Llama-2 for Llama-2-chat models, else the model's chat template
    LLAMA2 = "llama2"
    MODEL = "model"

    def for_model(self) -> str | None:
        """The core's value: None lets the loaded model decide."""
        return None if self is Template.AUTO else self.value


class CpuWeights(enum.StrEnum):
    """--cpu-weights: what a float32 model's products multiply with on the CPU (model.load.CPU_WEIGHTS)."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"
    GGUF = "gguf"


GptqBackend = enum.StrEnum("GptqBackend", [(name.upper(), name) for name in GPTQ_BACKENDS])
GptqBackend.__doc__ = "--gptq-backend: the GPTQ kernel (model.gptq.GPTQ_BACKENDS)."

FileOpt = Annotated[
    Optional[Path],
    typer.Option("--file", help="Persona file (default: $PERSONAS_FILE, ./personas.toml, the shipped library).",
                 dir_okay=False, show_default=False),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="embedded | llama2-13b-gptq | llama2-7b-gptq | auto | a local "
                 "directory | a .gguf file | a hub id. Default: \\[defaults].model, $PERSONAS_MODEL, auto.",
                 show_default=False),
]
GptqBackendOpt = Annotated[
    GptqBackend,
    typer.Option("--gptq-backend", help="GPTQ kernel. auto: Marlin on a CUDA card that supports it, else "
                 "gptqmodel's choice.", case_sensitive=False),
]
CpuWeightsOpt = Annotated[
    CpuWeights,
    typer.Option("--cpu-weights", help="On the CPU: gguf multiplies a GGUF model's layers with the file's own "
                 "Q4_0/Q4_1/Q8_0 blocks (AVX-512 VNNI; a C compiler builds the kernel once) and keeps the "
                 "others as float16; float16 keeps every weight in half precision for fbgemm's products "
                 "(about half the bytes a step reads; the rows stay float32); float32 multiplies with the "
                 "weights as loaded.", case_sensitive=False),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu).",
                 show_default=False),
]
PromptOpt = Annotated[
    Optional[str],
    typer.Option("--prompt", "-p", help="The user's message (default: the persona's own prompt).",
                 show_default=False),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Load pickle (.bin/.pt) weights, which can run code: only for "
                 "models you trust. By default only safetensors are loaded."),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Run Python code shipped with the model (never by default)."),
]
TemplateOpt = Annotated[
    Template,
    typer.Option("--template", help="Prompt format: auto (Llama-2 for Llama-2-chat models, else the model's "
                 "chat template), llama2, model."),
]
FastPathOpt = Annotated[
    bool,
    typer.Option("--fast-path/--no-fast-path", help="On CUDA: decode with a static KV cache and a captured "
                 "CUDA graph (much faster; off: transformers' plain generate)."),
]
DenseWeightsOpt = Annotated[Optional[bool], typer.Option(
    "--gptq-dense/--no-gptq-dense", help="GPTQ on CUDA: steps of 256 rows or more (large prompts files, "
    "prefill) multiply through a half-precision copy of the weights with cuBLAS, faster there than the 4-bit "
    "kernel; the copy takes 2 bytes a weight (25 GB for a 13B). Default: when the slots are 256 or more "
    "and the memory left still holds a row for each.", show_default=False)]
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", help="Most rows decoding at once (default: 512 on a GPU, where the cache pages the "
    "memory free after loading holds may allow fewer; 256 on the CPU).", min=1, show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", "-s", help="Base seed; the same seed repeats the same run (default: \\[defaults].seed, else "
    "random, printed).", min=0, show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this much probability "
    "(default: \\[defaults].top_p, else off).", show_default=False)]
LineTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", help="Most tokens per line (default: the game's, \\[defaults].max_new_tokens, else 128).",
    min=1, show_default=False)]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", help="Keep only the k most likely tokens, 0 = off (default: \\[defaults].top_k, else off).",
    show_default=False)]


# The logits rules beside temperature (sampling/rules.py; README: Sampling controls).
MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", help="Drop tokens less likely than this share of the likeliest one, after temperature "
    "(0–1; keeps high temperatures coherent).", show_default=False, rich_help_panel="Sampling controls")]
RepetitionPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", help="Penalise every token already in the prompt or the answer (> 0; 1 = off; "
    "1.1–1.3 is usual).", show_default=False, rich_help_panel="Sampling controls")]
FrequencyPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--frequency-penalty", help="Lower a token's logit by this much for each time it already appears in the "
    "answer (-2–2).", show_default=False, rich_help_panel="Sampling controls")]
PresencePenaltyOpt = Annotated[Optional[float], typer.Option(
    "--presence-penalty", help="Lower a token's logit by this much once it appears in the answer (-2–2).",
    show_default=False, rich_help_panel="Sampling controls")]
LogitBiasOpt = Annotated[Optional[list[str]], typer.Option(
    "--logit-bias", metavar="TOKEN=BIAS", help="Add BIAS (-100–100) to a token's logit; -100 bans it. TOKEN "
    "is its text or its id (digits); repeat for several.", show_default=False, rich_help_panel="Sampling controls")]
DryMultiplierOpt = Annotated[Optional[float], typer.Option(
    "--dry-multiplier", help="DRY: penalise the token that would extend a repeat of earlier text (0 = off; "
    "0.8 is usual).", show_default=False, rich_help_panel="Sampling controls")]
DryBaseOpt = Annotated[Optional[float], typer.Option(
    "--dry-base", help="DRY: how fast the penalty grows with the repeat's length (> 1; default 1.75).",
    show_default=False, rich_help_panel="Sampling controls")]
DryAllowedLengthOpt = Annotated[Optional[int], typer.Option(
    "--dry-allowed-length", help="DRY: repeats this long go unpenalised (default 2).", show_default=False,
    rich_help_panel="Sampling controls")]
DryBreakerOpt = Annotated[Optional[list[str]], typer.Option(
    "--dry-sequence-breaker", help="DRY: a repeat never runs across this text; repeat for several "
    "(default: newline, ':', '\"', '*').", show_default=False, rich_help_panel="Sampling controls")]


# The answer's shape (library/answer_format.py; README: Structured output).
JsonSchemaOpt = Annotated[Optional[str], typer.Option(
    "--json-schema", metavar="FILE_OR_JSON", help="Every answer valid JSON for this JSON schema (a file, or "
    "the schema itself). Compact JSON unless the schema says \"x-guidance\": {\"whitespace_flexible\": true}.",
    show_default=False, rich_help_panel="Answer format")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Every answer a JSON object (any keys).", rich_help_panel="Answer format")]
RegexOpt = Annotated[Optional[str], typer.Option(
    "--regex", metavar="PATTERN", help="Every answer matches this regular expression, whole.", show_default=False,
    rich_help_panel="Answer format")]
GrammarOpt = Annotated[Optional[Path], typer.Option(
    "--grammar", metavar="FILE", help="Every answer follows this Lark grammar (llguidance's dialect).",
    show_default=False, dir_okay=False, rich_help_panel="Answer format")]


def answer_format_from_flags(json_schema: str | None = None, json_object: bool = False, regex: str | None = None,
                             grammar: Path | None = None) -> AnswerFormat | None:
    """The answer format the flags ask for (at most one of them), checked by llguidance now,
    before anything slow."""
    given = [flag for flag, value in (("--json-schema", json_schema), ("--json", json_object), ("--regex", regex),
                                      ("--grammar", grammar)) if value]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} cannot be combined", "choose one answer format")
    try:
        if json_schema:
            return from_schema(json_schema)
        if json_object:
            return AnswerFormat.json_object()
        if regex:
            return checked(AnswerFormat("regex", regex))
        if grammar:
            try:
                text = grammar.read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"cannot read the grammar file {grammar}: {e.strerror or e}") from None
            return checked(AnswerFormat("lark", text))
    except ValueError as e:
        raise InputError(f"{given[0]}: {e}", "fix it (README: Structured output)") from None
    return None


def rules_from_flags(min_p: float | None = None, repetition_penalty: float | None = None,
                     frequency_penalty: float | None = None, presence_penalty: float | None = None,
                     logit_bias: list[str] | None = None, dry_multiplier: float | None = None,
                     dry_base: float | None = None, dry_allowed_length: int | None = None,
                     dry_sequence_breaker: list[str] | None = None,
                     answer_format: AnswerFormat | None = None) -> Rules:
    """The rules the flags give (None where a flag is not given), their ranges checked."""
    rules = Rules(min_p=min_p, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty,
                  logit_bias=tuple(parse_logit_bias(item) for item in logit_bias) if logit_bias else None,
                  dry_multiplier=dry_multiplier, dry_base=dry_base, dry_allowed_length=dry_allowed_length,
                  dry_sequence_breakers=tuple(dry_sequence_breaker) if dry_sequence_breaker else None,
                  answer_format=answer_format)
    check_rules(rules)
    return rules


def parse_logit_bias(item: str) -> tuple[int | str, float]:
    """`TOKEN=BIAS` (the last '=' splits: a token's text may hold one)."""
    token, sep, bias = item.rpartition("=")
    try:
        value = float(bias)
    except ValueError:
        value = None
    if not sep or not token or value is None:
        raise InputError(f"--logit-bias {item!r} is not TOKEN=BIAS", "write e.g. --logit-bias 'Aye=-100'")
    return token_key(token), value


# --- flag, else [defaults], else built in -----------------------------------------------------------


def sampling_settings(defaults: Defaults, *, max_new_tokens: int | None, top_p: float | None,
                      top_k: int | None, min_new_tokens: int = 0, batch_size: int | None = None,
                      fast_path: bool = True, dense_weights: bool | None = None, rules: Rules = NO_RULES) -> Settings:
    """The sampling settings in force: each flag, else `[defaults]`, else personas' built-in value.
    `rules` are the flags'; a persona's own come below them, and `[defaults]`' below those, per row."""
    return Settings(max_new_tokens=defaults.pick("max_new_tokens", max_new_tokens), min_new_tokens=min_new_tokens,
                    top_p=defaults.pick("top_p", top_p), top_k=defaults.pick("top_k", top_k),
                    max_batch=batch_size, fast_path=fast_path, dense_weights=dense_weights, rules=rules,
                    file_rules=rules_from(defaults))


@dataclass(frozen=True)
class Seed:
    """The base seed of a run, and whether it was drawn at random (then the user is told it)."""

    value: int
    random: bool

    def announce(self, feedback: Feedback) -> None:
        """Print a random seed, so the run can be repeated; call it once the input is checked."""
        if self.random:
            feedback.info(f"seed {self.value} (pass --seed {self.value} to repeat this run)")


def seed_in_force(seed: int | None, defaults: Defaults) -> Seed:
    """--seed, else `[defaults].seed`, else a random seed."""
    chosen = defaults.pick("seed", seed)
    return Seed(secrets.randbelow(2**31), True) if chosen is None else Seed(chosen, False)


RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", help="Spread the rows over Ray workers: 'local' (start a runtime here), 'auto', or a cluster's "
    "address (ray://head:10001). Needs personas\\[ray].", show_default=False)]
RayWorkersOpt = Annotated[Optional[int], typer.Option(
    "--ray-workers", help="Workers, each with the model loaded once (default: one per GPU of the cluster, "
    "else 2).", min=1, show_default=False)]


def check_ray(address: str | None, workers: int | None) -> None:
    """--ray needs the ray package; --ray-workers needs --ray. Checked before anything slow."""
    if address is not None:
        try:
            importlib.import_module("ray")  # only the check: generate.ray uses it
        except ImportError:
            raise InputError("--ray needs the ray package, which is not installed", "pip install 'personas[ray]'") from None
    elif workers is not None:
        raise InputError("--ray-workers goes with --ray", "pass --ray local (or a cluster's address)")


def ray_messages(feedback: Feedback) -> dict:
    """The Ray pool's `on_workers`, `on_lost` and `on_short` callbacks, as stderr lines."""
    return dict(on_workers=lambda pids: feedback.info(
                    f"{len(pids)} Ray worker{'s' if len(pids) != 1 else ''} ready, the model loaded in each"),
                on_lost=lambda left, requeued: feedback.warn(
                    f"a Ray worker died; its {requeued} unfinished rows go to the {left} left"),
                on_short=lambda room, count, unit: feedback.warn(
                    f"the Ray cluster has room for {room} of the {count} workers (one {unit} each) now; "
                    f"the run starts when it has room for all — lower --ray-workers not to wait"))
