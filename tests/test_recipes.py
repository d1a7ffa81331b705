"""Every shipped recipe loads and builds; the README documents every key and its commands match CI."""
import dataclasses
from pathlib import Path

import pytest

from catchup.config import TrainConfig, load_config
from catchup.mix import MIXERS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_loads_and_names_a_known_method(path):
    cfg = load_config(path)
    assert cfg.mix in MIXERS
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a recipe starts with a comment naming its table or purpose"


def test_readme_documents_every_recipe_key_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in readme]
    assert not missing, f"README does not document {missing}"
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(commands) == 2 and "configs/quickstart.yaml" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
