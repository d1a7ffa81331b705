"""A new mixing method is one small class: registered, it trains through train.py like the shipped ones."""
import csv
import json

import pytest
import torch

from catchup import CatchupError
from catchup.mix import MIXERS, Mixer, MixPlan, register_mixer
from catchup.stages import feature_stages
from tests.helpers import run_train


class HalfSwap(Mixer):
    """At a random stage, each sample takes its partner's second half of the channels."""
    name = "halfswap"
    feature_level = True
    mixed_at: list = []

    def default_layers(self, model):
        return list(range(1, len(feature_stages(model))))

    def feature_plan(self, stage, index):
        keep = stage.channels // 2
        return MixPlan(stage.layer, 0.5, index, keep / stage.channels)

    def mix_features(self, h, plan):
        HalfSwap.mixed_at.append(plan.layer)
        keep = h.shape[1] // 2
        return torch.cat([h[:, :keep], h[plan.index.to(h.device), keep:]], 1)


@pytest.fixture
def halfswap():
    register_mixer(HalfSwap)
    yield HalfSwap
    del MIXERS["halfswap"]         # other tests list the shipped methods


def test_a_registered_method_trains_through_train_py(tmp_path, halfswap):
    HalfSwap.mixed_at.clear()
    run_train(tmp_path / "run", "--mix", "halfswap")
    rows = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 22
    # one feature mix per training step, at the stages the method chose (never the input)
    assert len(HalfSwap.mixed_at) == 22 and set(HalfSwap.mixed_at) <= {1, 2, 3, 4, 5}


def test_a_name_is_registered_once(halfswap):
    class Other(Mixer):
        name = "halfswap"
    with pytest.raises(CatchupError, match="already registered"):
        register_mixer(Other)
    with pytest.raises(CatchupError, match="takes a Mixer subclass"):
        register_mixer(object)
