"""`train.py --help` and the README's key tables come from TrainConfig's `name: type = default  # meaning` lines."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import train
from catchup.config import TrainConfig
from catchup.config_help import markdown, readme_section, recipe_keys, update_readme
from catchup.errors import CatchupError
from catchup.mix import MIXERS

ROOT = Path(__file__).resolve().parents[1]


def _lines_of_config() -> list[tuple[str, str, str]]:
    """(group, key, meaning) read line by line from config.py with plain regular expressions."""
    out, group, inside = [], None, False
    for line in (ROOT / "catchup" / "config.py").read_text().splitlines():
        if line.startswith("class TrainConfig"):
            inside = True
        elif inside and line and not line.startswith(" "):
            break
        elif inside and (m := re.fullmatch(r"    # (\w[\w ]*)", line)):
            group = m.group(1)
        elif inside and (m := re.match(r"    (\w+): .*?  # (.*)$", line)):
            out.append((group, m.group(1), m.group(2)))
    return out


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_key_under_its_group_with_default_and_meaning(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")        # no wrapping inside the texts
    text = " ".join(_help(capsys).split())
    expected = _lines_of_config()
    assert [k for _, k, _ in expected] == [f.name for f in dataclasses.fields(TrainConfig)]
    position = -1
    for group, key, meaning in expected:
        title = text.index(f"{group} (recipe keys):")
        at = re.compile(rf" --{key.replace('_', '-')},? ").search(text, title).start()
        assert at > position, f"--{key} is out of TrainConfig's order"
        assert meaning.split(";")[0] in text[at:], key
        position = at
    assert "--lr FLOAT peak learning rate (default: 0.1)" in text
    assert "--mix-layers LIST" in text and "--channels-last, --no-channels-last" in text
    assert "(default: preactresnet18)" in text and "--wandb-tags LIST W&B run tags (default: [])" in text
    mix = text[text.index("--mix STR"):text.index("--mix-prob")]
    assert all(name in mix for name in MIXERS), "the mix key lists every registered method"


def test_recipe_keys_stay_overrides_for_load_config():
    args, overrides = train.parse_args(["-c", "r.yaml", "--lr", "0.05", "--no-model-ema", "--mix-layers=[0,2]"])
    assert args.config == "r.yaml" and overrides == ["--lr", "0.05", "--no-model-ema", "--mix-layers=[0,2]"]


@dataclass
class _Recipe:
    # first
    alpha: int = 3  # how many
    beta: list[str] = field(  # names,
        default_factory=lambda: ["a"])
    # second group
    gamma: float | None = None  # off when null; sharp: 50% (a | b)


@dataclass
class _Undocumented:
    # only
    delta: int = 1


def test_new_fields_in_the_comment_form_are_picked_up():
    docs = recipe_keys(_Recipe)
    assert [(d.group, d.name, d.default, d.metavar) for d in docs] == [
        ("first", "alpha", "3", "INT"), ("first", "beta", "[a]", "LIST"), ("second group", "gamma", "null", "FLOAT")]
    assert docs[1].meaning == "names,"
    table = markdown(docs)
    assert "| `gamma` | `null` | off when null; sharp: 50% (a &#124; b) |" in table
    assert table.index("**first**") < table.index("`beta`") < table.index("**second group**")
    with pytest.raises(CatchupError, match="delta"):
        recipe_keys(_Undocumented)


def test_readme_tables_are_generated_from_config(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert readme_section(readme) == markdown(), \
        "README recipe keys are stale: run python -m catchup.config_help --update-readme README.md"
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("| `lr` | `0.1` |", "| `lr` | `0.2` |"))
    assert update_readme(stale) and stale.read_text() == readme
    assert not update_readme(stale)
