"""Every shipped recipe loads and builds; the README documents every key and its commands match CI."""
import dataclasses
import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from catchup import recipe, runs
from catchup.config import TrainConfig, load_config
from catchup.config_checks import MIXER_ARGUMENTS, MODEL_ARGUMENTS
from catchup.errors import CatchupError
from catchup.data import DataInfo, build_datasets
from catchup.mix import MIXERS
from catchup.recipe import make_criterion, make_mixer, make_optimizer, make_scheduler
from catchup.runs import build_model
from tests.fixtures_data import write_cifar100, write_fashion, write_image_folders, write_tinyimagenet

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_loads_and_names_a_known_method(path):
    cfg = load_config(path)
    assert cfg.mix in MIXERS
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a recipe starts with a comment naming its table or purpose"


def _cifar100(root: Path) -> Path:
    write_cifar100(root, n_train=400)
    return root


def _fashion_mnist(root: Path) -> Path:
    write_fashion(root, n_train=300, n_test=10)
    return root


# tiny stand-ins in each dataset's published layout (so no test needs a download or a system package): a
# recipe's `data_dir` is replaced by one of these
_FIXTURES = {"cifar100": _cifar100, "tinyimagenet": write_tinyimagenet, "imagefolder": write_image_folders,
             "finegrained": write_image_folders, "fashion_mnist": _fashion_mnist}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    made: dict[str, str] = {}

    def data_dir(dataset: str) -> str | None:
        if dataset in _FIXTURES and dataset not in made:
            made[dataset] = str(_FIXTURES[dataset](tmp_path_factory.mktemp(dataset)))
        return made.get(dataset)
    return data_dir


def _build(path: Path, data_dirs) -> None:
    """What train.py builds from a recipe, with the model on the meta device."""
    cfg = load_config(path, {"data_dir": data_dirs(load_config(path).dataset)})
    train_set, eval_set, info = build_datasets(cfg.dataset, cfg.data_dir, train_fraction=cfg.train_fraction,
                                               seed=cfg.seed, input_size=cfg.input_size)
    side = cfg.input_size or info.input_size
    for dataset in (train_set, eval_set):
        image, label = dataset[0]                                  # the transforms run
        assert image.shape == (info.in_chans, side, side) and 0 <= label < info.num_classes
    if cfg.pretrained and not timm.list_pretrained(f"{cfg.model}.*"):   # nothing is downloaded here
        raise CatchupError(f"{cfg.model} has no pretrained weights in timm")
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, pretrained=False), info)
    mixer = make_mixer(cfg, model, info, process_index=0)
    assert mixer.name == cfg.mix
    assert mixer.prob == (type(mixer).default_prob if cfg.mix_prob is None else cfg.mix_prob)
    make_scheduler(cfg, make_optimizer(cfg, model), updates_per_epoch=10)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_builds_its_data_model_mixer_and_optimizer(path, data_dirs):
    _build(path, data_dirs)


@pytest.mark.parametrize("mix, prob, expected", [("moex", None, 0.25), ("snapmix", None, 0.5),
                                                 ("saliencymix", None, 0.5), ("catchup", None, 1.0),
                                                 ("moex", 1.0, 1.0)])
def test_mix_prob_left_out_is_the_methods_own(mix, prob, expected):
    cfg = load_config(None, {"mix": mix, "mix_prob": prob, "model_kwargs": {"width": 4}})
    _, _, info = build_datasets(cfg.dataset, cfg.data_dir, train_fraction=0.1, seed=0)
    assert make_mixer(cfg, build_model(cfg, info), info, process_index=0).prob == expected


def test_bce_target_threshold_turns_soft_targets_into_zeros_and_ones():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    soft = torch.tensor([[0.7, 0.25, 0.05], [0.1, 0.5, 0.4]])
    hard = [[1, 1, 0], [0, 1, 1]]     # above 0.2
    by_hand = sum(-math.log(1 / (1 + math.exp(-x))) if y else -math.log(1 - 1 / (1 + math.exp(-x)))
                  for row_x, row_y in zip(logits.tolist(), hard) for x, y in zip(row_x, row_y)) / 6
    criterion = make_criterion(load_config(None, {"bce_loss": True, "bce_target_thresh": 0.2}))
    assert criterion(logits, soft).item() == pytest.approx(by_hand, rel=1e-6)
    plain = make_criterion(load_config(None, {"bce_loss": True}))(logits, soft).item()
    assert plain != pytest.approx(by_hand, rel=1e-3)      # without the threshold the soft targets stay


@pytest.mark.parametrize("line, problem", [
    ("model: preactresnet81", "unknown model 'preactresnet81'"),
    ("model_kwargs: {depth: 3}", "does not accept these model_kwargs"),
    ("mix_kwargs: {block_nums: 4}", "takes no option 'block_nums'"),
    ("pretrained: true", "no pretrained weights"),
])
def test_a_recipe_that_cannot_be_built_fails(tmp_path, data_dirs, line, problem):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"_base_: {ROOT / 'configs' / 'cifar100' / 'preactresnet18_puzzlemix.yaml'}\n{line}\n")
    with pytest.raises(CatchupError, match=problem):
        _build(recipe, data_dirs)


def test_the_built_in_defaults_train_with_a_constant_lr():
    """An empty recipe is valid: multistep with no milestones never decays (after the warmup, when there is one)."""
    cfg = load_config(None)
    assert cfg.sched == "multistep" and cfg.decay_milestones == []
    scheduler = make_scheduler(cfg, make_optimizer(cfg, nn.Linear(2, 2)), updates_per_epoch=10)
    lrs = [scheduler._get_lr(step)[0] for step in (0, 10, 500, 999)]
    assert lrs == [cfg.lr] * 4


def test_the_arguments_the_code_passes_are_the_ones_kwargs_may_not_repeat(monkeypatch):
    """config_checks.MIXER_ARGUMENTS / MODEL_ARGUMENTS list what make_mixer and build_model pass themselves, so
    that `mix_kwargs: {num_classes: 3}` is refused up front instead of colliding there."""
    passed = {}
    monkeypatch.setattr(recipe, "build_mixer", lambda name, model, **kwargs: passed.setdefault("mixer", kwargs))
    monkeypatch.setattr(runs.timm, "create_model", lambda name, **kwargs: passed.setdefault("model", kwargs))
    cfg = load_config(None, {"mix": "puzzlemix", "mix_alpha": 2.0, "mix_prob": 0.5, "drop_path": 0.1})
    info = DataInfo(num_classes=10, in_chans=3, input_size=32, mean=(0.5,) * 3, std=(0.2,) * 3, family="cifar")
    recipe.make_mixer(cfg, None, info, process_index=0)
    build_model(cfg, info)
    assert set(passed["mixer"]) == set(MIXER_ARGUMENTS)
    assert set(passed["model"]) == set(MODEL_ARGUMENTS)
    for name, where in (("mix_kwargs", MIXER_ARGUMENTS), ("model_kwargs", MODEL_ARGUMENTS)):
        for argument in where:
            with pytest.raises(CatchupError, match=f"recipe key '{name}' cannot set '{argument}'"):
                load_config(None, {name: {argument: 1}})


def test_readme_documents_every_recipe_key_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in readme]
    assert not missing, f"README does not document {missing}"
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(commands) == 2 and "configs/quickstart.yaml" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
