"""Games: the TOML schema and its refusals, secrets, judging, statistics, and batched episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, make_tiny_llama, run_cli

from personas.cli import main
from personas.dialogue.conversation import Line, seat_dialog
from personas.model.choice import resolve_model
from personas.model.load import load_model
from personas.errors import PersonaFileError
from personas.library.load import load_library, parse_library
from personas.dialogue.play import episode_seeds, judge, play_episodes, start_episode, summarize, turn_for, wilson_interval
from personas.sampling.grid import Settings

SHIPPED = load_library(REPO / "personas.toml")

GAME = """
[personas.spy]
system = "You are a spy."
[personas.guard]
system = "You are a guard."

[games.g]
max_turns = 4
otherwise = "guard"
[games.g.players.spy]
persona = "spy"
brief = "Get the password."
[games.g.players.guard]
persona = "guard"
brief = "The password is {word}. Never say it."
secrets = { word = ["marmalade", "thunder"] }
[[games.g.win]]
speaker = "guard"
says = "{word}"
winner = "spy"
"""


def parse(text: str):
    return parse_library(text, Path("games.toml"))


def test_the_shipped_games_load_with_their_players_and_teams():
    assert set(SHIPPED.games) == {"password", "treasure", "word-race"}
    race = SHIPPED.games["word-race"]
    teams = {p: race.team_of(p) for p in race.players}
    assert sorted(teams.values()) == ["blue", "blue", "red", "red"]
    assert race.scored_side == "red" and len(race.win) == 4
    assert SHIPPED.games["password"].players["guard"].secrets["word"]


@pytest.mark.parametrize("change,line,message", [
    (('persona = "spy"', 'persona = "spyy"'), 11, "player 'spy': unknown persona 'spyy'"),
    (('brief = "Get the password."', 'brief = "Get {word}."'), 12, "the brief of player 'spy' names {word}, which belongs to 'guard'"),
    (('brief = "Get the password."', 'brief = "Try marmalade."'), 10, "secret 'word' ('marmalade') appears in what player 'spy' sees"),
    (('winner = "spy"', 'winner = "thief"'), 20, "'thief' is neither a player nor a team"),
    (('speaker = "guard"', 'speaker = "king"'), 18, "speaker 'king' is not a player"),
    (('says = "{word}"', "pattern = '(unclosed'"), 19, "pattern is not a regular expression"),
    (('says = "{word}"', 'says = "{code}"'), 17, "win rule names {code}, which no player holds"),
    (('max_turns = 4', 'max_turns = 4\norder = ["spy"]'), 9, "guard never speaks"),
    (('max_turns = 4', 'max_turns = 0'), 8, "max_turns: Input should be greater than or equal to 1"),
    (('persona = "spy"', 'persona = "spy"\nsystem = "x"'), 10, "give either persona"),
    (('says = "{word}"', 'says = "{word}"\nscore = 1'), 20, "unknown key 'score'"),
])
def test_bad_games_are_refused_with_file_and_line(change, line, message):
    with pytest.raises(PersonaFileError) as error:
        parse(GAME.replace(*change, 1))
    assert f"games.toml:{line}:" in str(error.value) and message in str(error.value), str(error.value)


def test_a_misspelt_key_names_the_known_keys_of_its_table():
    with pytest.raises(PersonaFileError) as error:
        parse(GAME.replace('brief = "Get the password."', 'breif = "Get the password."'))
    assert "players.spy: unknown key 'breif'" in str(error.value)
    assert "known keys: persona, system, examples, team, brief, secrets" in str(error.value)


def test_secrets_are_drawn_from_the_episode_seed():
    game = parse(GAME).games["g"]
    draws = {start_episode(game, 1, seed, 1.0).secrets["word"] for seed in range(40)}
    assert draws == {"marmalade", "thunder"}
    assert start_episode(game, 1, 7, 0.2).secrets == start_episode(game, 3, 7, 1.5).secrets


def test_judge_checks_the_speaker_whole_words_and_the_turn_cap():
    game = parse(GAME).games["g"]
    episode = start_episode(game, 1, 7, 1.0)
    word = episode.secrets["word"]
    judge(episode, Line(1, "spy", f"Is it {word}?", 1.0, 1, 3, "stop"), max_turns=4)  # the spy's line: no
    judge(episode, Line(2, "guard", f"No{word}s here.", 1.0, 2, 3, "stop"), max_turns=4)  # not a whole word
    assert episode.ended_at is None
    judge(episode, Line(3, "spy", "Please?", 1.0, 3, 3, "stop"), max_turns=4)
    judge(episode, Line(4, "guard", f"Fine: {word.upper()}!", 1.0, 4, 3, "stop"), max_turns=4)
    assert (episode.winner, episode.ended_at) == ("spy", 4)
    capped = start_episode(game, 1, 7, 1.0)
    for turn in (1, 2):
        judge(capped, Line(turn, "spy" if turn % 2 else "guard", "Hm.", 1.0, turn, 3, "stop"), max_turns=2)
    assert (capped.winner, capped.ended_at) == ("guard", 2)


def test_wilson_interval_matches_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)


def test_summary_counts_the_scored_sides_wins_and_turns():
    game = parse(GAME).games["g"]
    episodes = []
    for k, (winner, ended) in enumerate([("spy", 2), ("spy", 4), ("guard", 4), (None, 3)], start=1):
        e = start_episode(game, k, k, 0.5)
        e.winner, e.ended_at = winner, ended
        episodes.append(e)
    [summary] = summarize(game, episodes)
    assert (summary.episodes, summary.wins, summary.win_rate, summary.mean_turns_to_win) == (4, 2, 0.5, 3.0)
    assert summary.outcomes == {"guard": 1, "nobody": 1, "spy": 2}
    assert summary.example is episodes[0]


# --- episodes on a tiny real model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """A tiny random Llama with room for a game's prompts (the byte-level toy tokenizer spends
    a token on almost every character of the shipped personas)."""
    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny-long"), context=4096)
    return load_model(resolve_model(str(folder)), device="cpu")


SETTINGS = Settings(max_new_tokens=5)


def test_all_episodes_take_each_turn_in_one_batched_run(tiny_long):
    from personas.engine.engine import Engine

    game = SHIPPED.games["word-race"]
    calls = []
    real_submit = Engine.submit

    def counting_submit(self, rows, *args, **kwargs):  # a spy: counts the rows, then submits them
        rows = list(rows)
        calls.append(len(rows))
        return real_submit(self, rows, *args, **kwargs)

    Engine.submit = counting_submit
    try:
        episodes = play_episodes(tiny_long, game, SHIPPED.personas, [0.2, 1.0], episode_seeds(1, game.name, 3),
                                 SETTINGS, max_turns=4)
    finally:
        Engine.submit = real_submit
    assert calls == [6, 6, 6, 6]  # 2 temperatures x 3 episodes, every turn, one engine run each
    assert [[line.speaker for line in e.lines] for e in episodes] == [game.turn_order] * 6


def test_no_secret_reaches_another_players_prompt(tiny_long):
    game = SHIPPED.games["word-race"]
    episodes = play_episodes(tiny_long, game, SHIPPED.personas, [1.0], episode_seeds(2, game.name, 4), SETTINGS,
                             max_turns=8)
    for episode in episodes:
        for number in range(1, len(episode.lines) + 1):
            turn = turn_for(episode, number, SHIPPED.personas)
            prompt = tiny_long.prompt_text(seat_dialog(turn)).lower()
            for name, value in episode.secrets.items():
                holder = next(p for p, player in game.players.items() if name in player.secrets)
                spoken = any(value in line.text.lower() for line in episode.lines[:number - 1])
                if turn.seat.name == holder:
                    assert value in prompt
                elif not spoken:  # said aloud in a line, a word is public; otherwise never seen
                    assert value not in prompt, (turn.seat.name, name)


def test_an_episode_replays_from_its_seed_alone(tiny_long):
    game = SHIPPED.games["password"]
    seeds = episode_seeds(3, game.name, 3)
    episodes = play_episodes(tiny_long, game, SHIPPED.personas, [1.0], seeds, SETTINGS, max_turns=4)
    [replayed] = play_episodes(tiny_long, game, SHIPPED.personas, [1.0], [episodes[1].seed], SETTINGS, max_turns=4)
    assert replayed.lines == episodes[1].lines and replayed.secrets == episodes[1].secrets
    assert episodes[0].lines != episodes[1].lines


def test_play_cli_json_on_a_tiny_model_with_transcripts(tiny_long, cache_dir, tmp_path):
    out = tmp_path / "episodes.jsonl"
    result = run_cli(["play", "password", "-t", "0", "-t", "1.0", "-n", "3", "--max-turns", "2", "--seed", "4",
                      "--max-new-tokens", "4", "--model", tiny_long.label, "--transcripts", str(out)], cache_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["temperature"] for r in report] == [0.0, 1.0]
    for r in report:
        assert r["episodes"] == 3 and 0 <= r["wins"] <= 3 and r["win_rate"] == r["wins"] / 3
        lo, hi = r["win_rate_ci95"]
        assert 0 <= lo <= r["win_rate"] <= hi <= 1
        assert sum(r["outcomes"].values()) == 3
        assert [line["speaker"] for line in r["example"]["lines"]][:2] == ["detective", "guard"]
    episodes = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(episodes) == 6 and {e["secrets"]["word"] for e in episodes} <= set(
        SHIPPED.games["password"].players["guard"].secrets["word"])


@pytest.mark.parametrize("args,message", [
    (["play", "pasword"], "did you mean 'password', 'word-race'?"),
    (["play", "password", "-n", "0"], "Invalid value for '-n'"),
    (["play", "password", "-t", "-2"], "temperature -2.0 is not allowed"),
    (["play", "password", "--format", "csv"], "unknown format 'csv'"),
    (["play", "password", "--template", "fancy"], "unknown template 'fancy'"),
    (["play", "password", "--top-k", "-1"], "--top-k -1 is not allowed"),
])
def test_play_bad_input_is_refused_before_loading_a_model(args, message, capsys):
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


@pytest.mark.slow
def test_play_end_to_end_on_the_embedded_model(embedded_ready):
    result = run_cli(["play", "treasure", "-t", "0.7", "-n", "2", "--max-turns", "2", "--seed", "9",
                      "--max-new-tokens", "12"], embedded_ready)
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert report["episodes"] == 2 and report["example"]["secrets"]["place"]
    again = run_cli(["play", "treasure", "-t", "0.7", "-n", "2", "--max-turns", "2", "--seed", "9",
                     "--max-new-tokens", "12"], embedded_ready)
    assert again.stdout == result.stdout  # every episode reproduced from the seed
    assert [line["speaker"] for line in report["example"]["lines"]] == ["inspector", "captain"][:report["example"]["turns"]]
    table = run_cli(["play", "treasure", "-t", "0.7", "-n", "2", "--max-turns", "2", "--seed", "9",
                     "--max-new-tokens", "12", "--format", "table"], embedded_ready)
    assert table.returncode == 0, table.stderr
    assert "treasure: wins for inspector" in table.stdout and "episode" in table.stdout


def test_decided_episodes_stop_and_are_handed_over_as_they_end(tiny_long):
    # The guard "says" anything: every episode is decided by its second line, well before the cap.
    library = parse(GAME.replace('says = "{word}"', "pattern = '.'").replace("max_turns = 4", "max_turns = 6"))
    game = library.games["g"]
    turns, ended = [], []
    episodes = play_episodes(tiny_long, game, library.personas, [0.5, 1.0], episode_seeds(5, "g", 2), SETTINGS,
                             on_turn=lambda turn, _cap, live: turns.append((turn, live)),
                             on_end=lambda e: ended.append((e.number, e.temperature, len(e.lines))))
    assert turns == [(1, 4), (2, 4)]
    assert sorted(ended) == [(1, 0.5, 2), (1, 1.0, 2), (2, 0.5, 2), (2, 1.0, 2)]
    assert all(e.winner == "spy" and e.ended_at == 2 for e in episodes)
