"""Conversations: each seat's view, line cleaning, speaking order, temperatures, and `personas chat`."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

from personas.cli import main
from personas.dialogue.chat import chat_lines, chat_temperatures, speaking_order
from personas.dialogue.conversation import Line, Seat, Turn, clean_line, seat_dialog
from personas.errors import InputError
from personas.library.schema import Example, Persona
from personas.model.prompt import llama2_text
from personas.sampling.grid import Settings


def line(turn: int, speaker: str, text: str) -> Line:
    return Line(turn, speaker, text, 0.7, turn, 3, "stop")


PIRATE = Seat("pirate", "You are a pirate.", (("Hi", "Arr"),))
CRITIC = Seat("critic", "You are a critic.")
LINES = (line(1, "pirate", "Ahoy!"), line(2, "critic", "Meh."), line(3, "pirate", "Tea?"))


# --- each speaker's seat ------------------------------------------------------------------------


def test_own_lines_are_assistant_turns_and_others_user_turns_with_names():
    dialog = seat_dialog(Turn(CRITIC, ("pirate", "critic"), LINES, "The shop opens.", 0.7, 1))
    assert dialog.examples == (("The shop opens.\n\npirate: Ahoy!", "Meh."),)
    assert dialog.user == "pirate: Tea?"
    assert dialog.system.startswith("You are a critic.\n\nYou are critic, in a conversation with pirate.")
    # The same lines from the other seat: its example first, then the conversation.
    mine = seat_dialog(Turn(PIRATE, ("pirate", "critic"), LINES[:2], None, 0.7, 1))
    assert mine.examples == (("Hi", "Arr"), ("(You speak first. Open the conversation with critic.)", "Ahoy!"))
    assert mine.user == "critic: Meh."


def test_the_first_speaker_answers_the_opener_or_a_cue():
    assert seat_dialog(Turn(PIRATE, ("pirate", "critic"), (), "Rain.", 0.7, 1)).user == "Rain."
    assert "speak first" in seat_dialog(Turn(PIRATE, ("pirate", "critic"), (), None, 0.7, 1)).user


def test_three_speakers_merge_the_others_lines_into_one_user_turn():
    lines = (line(1, "a", "one"), line(2, "b", "two"), line(3, "c", "three"))
    dialog = seat_dialog(Turn(Seat("a", None), ("a", "b", "c"), lines, None, 0.7, 1))
    assert dialog.user == "b: two\n\nc: three"
    assert "with b and c" in dialog.system
    text = llama2_text(dialog)
    assert text.count("[INST]") == 2 and text.count("</s>") == 1  # strictly alternating turns


def test_clean_line_drops_own_name_and_cuts_where_another_speaker_starts():
    assert clean_line("pirate: Arr, tea!", "pirate", ["pirate", "critic"]) == "Arr, tea!"
    assert clean_line("**Pirate:** Arr!\ncritic: Meh.\npirate: more", "pirate", ["pirate", "critic"]) == "Arr!"
    assert clean_line("  Arr, critic: you again?  ", "pirate", ["pirate", "critic"]) == "Arr, critic: you again?"
    assert clean_line("critic: I will speak for you", "pirate", ["pirate", "critic"]) == ""


# --- order and temperatures ---------------------------------------------------------------------


def test_round_robin_starts_with_the_first_and_random_never_repeats_a_speaker():
    assert speaking_order(["a", "b", "c"], 7, "round-robin", 1) == ["a", "b", "c", "a", "b", "c", "a"]
    random_order = speaking_order(["a", "b", "c"], 200, "random", 5)
    assert all(x != y for x, y in zip(random_order, random_order[1:]))
    assert set(random_order) == {"a", "b", "c"}
    assert random_order == speaking_order(["a", "b", "c"], 200, "random", 5)
    assert random_order != speaking_order(["a", "b", "c"], 200, "random", 6)
    with pytest.raises(InputError, match="unknown order"):
        speaking_order(["a", "b"], 2, "alphabetical", 1)


def test_temperatures_named_then_toml_then_everyone_then_default():
    a, b, c = Persona(name="a", temperature=1.3), Persona(name="b"), Persona(name="c")
    assert chat_temperatures([a, b, c], []) == {"a": 1.3, "b": 0.7, "c": 0.7}
    assert chat_temperatures([a, b, c], ["0.2", "c=0"]) == {"a": 1.3, "b": 0.2, "c": 0.0}
    assert chat_temperatures([a, b], ["a=0.5"]) == {"a": 0.5, "b": 0.7}
    for bad, message in [(["z=1"], "'z' is not in this chat"), (["a=hot"], "is not a temperature"),
                         (["-1"], "not allowed"), (["a=nan"], "not allowed")]:
        with pytest.raises(InputError, match=message):
            chat_temperatures([a, b], bad)


# --- on a tiny real model -----------------------------------------------------------------------


PERSONAS = [Persona(name="fox", system="You are a quick brown fox.",
                    examples=[Example(user="How are you?", assistant="I am fine.")]),
            Persona(name="dog", system="You are a lazy dog.", temperature=0.0)]


def test_a_chat_is_reproducible_from_its_seed_and_uses_each_persona_temperature(tiny):
    settings = Settings(max_new_tokens=6)
    temps = chat_temperatures(PERSONAS, ["fox=1.5"])
    lines = list(chat_lines(tiny, PERSONAS, temps, 5, 11, settings, opener="Hello there"))
    assert [(l.turn, l.speaker, l.temperature) for l in lines] == [
        (1, "fox", 1.5), (2, "dog", 0.0), (3, "fox", 1.5), (4, "dog", 0.0), (5, "fox", 1.5)]
    assert len({l.seed for l in lines}) == 5
    assert lines == list(chat_lines(tiny, PERSONAS, temps, 5, 11, settings, opener="Hello there"))
    other = list(chat_lines(tiny, PERSONAS, temps, 5, 12, settings, opener="Hello there"))
    assert [l.text for l in other] != [l.text for l in lines]


def test_chat_cli_jsonl_on_a_tiny_model(tiny_llama_dir, cache_dir, tmp_path):
    (tmp_path / "p.toml").write_text(
        '[personas.fox]\nsystem = "You are a quick brown fox."\ntemperature = 1.5\n'
        '[personas.dog]\nsystem = "You are a lazy dog."\n[personas.cat]\nsystem = "You are a cat."\n')
    args = ["chat", "fox", "dog", "cat", "--turns", "4", "--seed", "3", "--max-new-tokens", "5", "-t", "cat=0",
            "--file", str(tmp_path / "p.toml"), "--model", str(tiny_llama_dir), "--opener", "Hello there"]
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr
    records = [json.loads(x) for x in result.stdout.splitlines()]
    assert [list(r) for r in records] == [["turn", "speaker", "text", "temperature", "seed"]] * 4
    assert [(r["turn"], r["speaker"], r["temperature"]) for r in records] == [
        (1, "fox", 1.5), (2, "dog", 0.7), (3, "cat", 0.0), (4, "fox", 1.5)]
    assert run_cli(args, cache_dir).stdout == result.stdout


@pytest.mark.parametrize("args,message", [
    (["chat", "pirate"], "a chat needs at least two personas"),
    (["chat", "pirate", "pirate"], "only one seat"),
    (["chat", "pirate", "critic", "--turns", "0"], "--turns 0 is not allowed"),
    (["chat", "pirate", "critic", "--opener", " "], "the opener is empty"),
    (["chat", "pirate", "critic", "-t", "noir=1"], "'noir' is not in this chat"),
    (["chat", "pirate", "critic", "--order", "loud"], "unknown order 'loud'"),
    (["chat", "pirate", "critic", "--template", "fancy"], "unknown template 'fancy'"),
    (["chat", "pirate", "critic", "--top-p", "1.5"], "--top-p 1.5 is not allowed"),
    (["chat", "pirate", "critc"], "did you mean 'critic'?"),
])
def test_chat_bad_input_is_refused_before_loading_a_model(args, message, capsys):
    assert main([*args, "--file", str(REPO / "personas.toml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


@pytest.mark.slow
def test_chat_end_to_end_on_the_embedded_model(embedded_ready):
    result = run_cli(["chat", "pirate", "critic", "--turns", "3", "--seed", "5", "--max-new-tokens", "16",
                      "--opener", "The tea shop has just opened."], embedded_ready)
    assert result.returncode == 0, result.stderr
    records = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["speaker"] for r in records] == ["pirate", "critic", "pirate"]
    assert all(r["text"].strip() for r in records)
    transcript = run_cli(["chat", "pirate", "critic", "--turns", "3", "--seed", "5", "--max-new-tokens", "16",
                          "--opener", "The tea shop has just opened.", "--format", "transcript"], embedded_ready)
    assert transcript.returncode == 0, transcript.stderr
    assert transcript.stdout.startswith("The tea shop has just opened.")
    for r in records:  # the same lines, in the readable form
        assert f"{r['turn']}  {r['speaker']}" in transcript.stdout
        assert r["text"].split()[0] in transcript.stdout
