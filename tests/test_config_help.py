"""`train.py --help`, the README's key tables, the range checks and the resumable set all come from TrainConfig's
`key(default, help, rule, group=..., choices=..., resumable=...)` fields."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import train
from catchup import rundir
from catchup.config import RESUMABLE, TrainConfig, validate
from catchup.config_checks import at_least, key, within
from catchup.config_help import markdown, readme_section, recipe_keys, update_readme
from catchup.errors import CatchupError
from catchup.mix import MIXERS

ROOT = Path(__file__).resolve().parents[1]


def _described() -> list[tuple[str, str, str]]:
    """(group, key, help) of every TrainConfig field, straight from its metadata."""
    return [(f.metadata["group"], f.name, f.metadata["help"]) for f in dataclasses.fields(TrainConfig)]


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_key_under_its_group_with_default_and_meaning(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")        # no wrapping inside the texts
    text = " ".join(_help(capsys).split())
    expected = _described()
    position = -1
    for group, key, meaning in expected:
        title = text.index(f"{group} (recipe keys):")
        at = re.compile(rf" --{key.replace('_', '-')},? ").search(text, title).start()
        assert at > position, f"--{key} is out of TrainConfig's order"
        assert meaning.split(";")[0] in text[at:], key
        position = at
    assert "--lr FLOAT peak learning rate (> 0; default: 0.1)" in text
    assert "--epochs INT training epochs (>= 1; may change on --resume; default: 100)" in text
    assert "--mix-layers LIST" in text and "--channels-last, --no-channels-last" in text
    assert "(default: preactresnet18)" in text
    assert "--wandb-tags LIST W&B run tags (may change on --resume; default: [])" in text
    mix = text[text.index("--mix STR"):text.index("--mix-prob")]
    assert all(name in mix for name in MIXERS), "the mix key lists every registered method"


def test_recipe_keys_stay_overrides_for_load_config():
    args, overrides = train.parse_args(["-c", "r.yaml", "--lr", "0.05", "--no-model-ema", "--mix-layers=[0,2]"])
    assert args.config == "r.yaml" and overrides == ["--lr", "0.05", "--no-model-ema", "--mix-layers=[0,2]"]


@dataclass
class _Recipe:
    alpha: int = key(3, "how many", at_least(1), group="first", resumable=True)
    beta: list[str] = key(["a"], "names,", group="first", choices=("a", "b"))
    gamma: float | None = key(None, "off when null; sharp: 50% (a | b)", within(0, 1, "(]"), group="second group")


@dataclass
class _Undocumented:
    # a group in a comment
    delta: int = 1  # and a meaning in a comment: neither is read any more


def test_a_new_key_is_one_field_and_shows_up_with_its_rule_choices_and_resume_mark():
    docs = recipe_keys(_Recipe)
    assert [(d.group, d.name, d.default, d.metavar, d.values) for d in docs] == [
        ("first", "alpha", "3", "INT", ">= 1; may change on --resume"), ("first", "beta", "[a]", "LIST", "a, b"),
        ("second group", "gamma", "null", "FLOAT", "in (0, 1] or null")]
    assert _Recipe().beta is not _Recipe().beta          # list defaults are fresh per config
    table = markdown(docs)
    assert "| `gamma` | `null` | off when null; sharp: 50% (a &#124; b) | in (0, 1] or null |" in table
    assert table.index("**first**") < table.index("`beta`") < table.index("**second group**")
    with pytest.raises(CatchupError, match="field 'delta' is not described: declare it with"):
        recipe_keys(_Undocumented)


def test_the_rules_in_the_metadata_are_the_ones_validate_applies():
    """For every key with a rule: validate refuses a probe value exactly when the rule does, naming the rule."""
    probes = [-1, 0, 0.5, 1, 2, 2**40, [0.9, 0.1], [0.1, 0.9], [-1.0, 1.0], [3, 2]]
    base = TrainConfig(epochs=10**12, bce_loss=True)
    refused = 0
    for f in dataclasses.fields(TrainConfig):
        for value in probes if f.metadata["rule"] else []:
            try:
                validate(dataclasses.replace(base, **{f.name: value}))
                message = ""
            except CatchupError as err:
                message = str(err)
            if "expects" in message or message and f"recipe key '{f.name}'" not in message:
                continue        # not a value of this key's type, or another key's check answered first
            assert f.metadata["rule"].test(value) == (not message), (f.name, value, message)
            if message:
                assert f"recipe key '{f.name}' must be {f.metadata['rule'].text}" in message
                refused += 1
    assert refused > 50


def test_the_resumable_set_is_read_from_the_keys():
    marked = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resumable"]]
    assert RESUMABLE == tuple(marked) and {"epochs", "output", "wandb_name"} <= set(RESUMABLE)
    assert "lr" not in RESUMABLE and "seed" not in RESUMABLE
    assert rundir.RESUMABLE is RESUMABLE       # the run folder's resume check reads the same set


def test_readme_tables_are_generated_from_config(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert readme_section(readme) == markdown(), \
        "README recipe keys are stale: run python -m catchup.config_help --update-readme README.md"
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("| `lr` | `0.1` |", "| `lr` | `0.2` |"))
    assert update_readme(stale) and stale.read_text() == readme
    assert not update_readme(stale)
