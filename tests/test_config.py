"""Recipes: inheritance, command-line overrides, type and value checks, error messages, dump round trip."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from catchup.config import (
    TrainConfig, config_to_dict, dump_config, load_config, parse_overrides, validate,
)
from catchup.errors import CatchupError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error(fn, *args) -> str:
    with pytest.raises(CatchupError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ defaults and the dataclass

def test_defaults_without_a_file():
    assert load_config(None) == TrainConfig()
    cfg = TrainConfig()
    assert (cfg.model, cfg.batch_size, cfg.opt, cfg.lr, cfg.sched, cfg.mix) == (
        "preactresnet18", 128, "sgd", 0.1, "multistep", "none")
    assert cfg.decay_milestones == [] and cfg.model_kwargs == {} and cfg.wandb_tags == []
    assert cfg.decay_milestones is not TrainConfig().decay_milestones  # no shared mutable defaults


def test_plain_recipe_and_exponent_floats(tmp_path):
    recipe = write(tmp_path / "r.yaml", "lr: 5e-2\nweight_decay: 1e-4\nepochs: 3\nmix: catchup\n"
                                        "decay_milestones: [1, 2]\nmodel_kwargs: {stem_stride: 2}\n")
    cfg = load_config(recipe)
    assert cfg.lr == 0.05 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 1e-4  # YAML 1.1 alone would read `1e-4` as a string
    assert cfg.epochs == 3 and cfg.mix == "catchup" and cfg.decay_milestones == [1, 2]
    assert cfg.model_kwargs == {"stem_stride": 2}


def test_empty_recipe_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "# nothing yet\n")) == TrainConfig()


# ------------------------------------------------------------------ inheritance

def test_two_levels_of_base(tmp_path):
    write(tmp_path / "base.yaml", "lr: 0.2\nepochs: 50\nbatch_size: 64\n")
    write(tmp_path / "mid.yaml", "_base_: base.yaml\nepochs: 20\nmix: mixup\n")
    leaf = write(tmp_path / "leaf.yaml", "_base_: mid.yaml\nmix: cutmix\n")
    cfg = load_config(leaf)
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.mix) == (0.2, 20, 64, "cutmix")


def test_list_of_bases_later_wins(tmp_path):
    write(tmp_path / "a.yaml", "lr: 0.3\nepochs: 7\n")
    write(tmp_path / "b.yaml", "lr: 0.4\nseed: 5\n")
    child = write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\nseed: 9\n")
    cfg = load_config(child)
    assert (cfg.lr, cfg.epochs, cfg.seed) == (0.4, 7, 9)


def test_base_paths_are_relative_to_the_recipe_not_the_cwd(tmp_path, monkeypatch):
    write(tmp_path / "configs" / "common" / "base.yaml", "lr: 0.05\n")
    write(tmp_path / "configs" / "cifar" / "pre.yaml", "_base_: ../common/base.yaml\nepochs: 4\n")
    leaf = write(tmp_path / "configs" / "cifar" / "run.yaml", "_base_: pre.yaml\nseed: 3\n")
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../../configs/cifar/run.yaml")
    assert (cfg.lr, cfg.epochs, cfg.seed) == (0.05, 4, 3)
    assert load_config(leaf) == cfg


def test_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "epochs: 9\n")
    write(tmp_path / "x.yaml", "_base_: root.yaml\nlr: 0.2\n")
    write(tmp_path / "y.yaml", "_base_: root.yaml\nseed: 2\n")
    cfg = load_config(write(tmp_path / "z.yaml", "_base_: [x.yaml, y.yaml]\n"))
    assert (cfg.epochs, cfg.lr, cfg.seed) == (9, 0.2, 2)


def test_cycle_names_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: c.yaml\n")
    write(tmp_path / "c.yaml", "_base_: a.yaml\n")
    message = error(load_config, tmp_path / "a.yaml")
    assert "cycle" in message
    chain = [Path(p.strip()).name for p in message.split(":", 1)[1].split("->")]
    assert chain == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]


def test_self_base_is_a_cycle(tmp_path):
    assert "cycle" in error(load_config, write(tmp_path / "s.yaml", "_base_: s.yaml\n"))


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "child.yaml", "_base_: nowhere.yaml\n")
    message = error(load_config, child)
    assert "nowhere.yaml" in message and "child.yaml" in message


def test_bad_base_value(tmp_path):
    assert "_base_" in error(load_config, write(tmp_path / "b.yaml", "_base_: 3\n"))


# ------------------------------------------------------------------ command-line overrides

def test_parse_overrides_forms():
    parsed = parse_overrides(["--lr", "0.05", "--mix=none", "--data-dir", "d", "--channels-last",
                              "--epochs=3", "--no-pretrained", "--mix_layers", "[0,1,2]",
                              "--wandb-entity", "null", "--seed", "-4"])
    assert parsed == {"lr": 0.05, "mix": "none", "data_dir": "d", "channels_last": True, "epochs": 3,
                      "pretrained": False, "mix_layers": [0, 1, 2], "wandb_entity": None, "seed": -4}
    assert isinstance(parsed["lr"], float) and isinstance(parsed["epochs"], int)


def test_overrides_of_every_type(tmp_path):
    recipe = write(tmp_path / "r.yaml", "lr: 0.1\nclip_grad: 1.0\nchannels_last: true\nmodel_ema: false\n")
    cfg = load_config(recipe, [
        "--lr", "2e-3",                          # float, exponent form
        "--weight_decay", "0",                   # int accepted for float
        "--epochs", "30",                        # int
        "--model-ema",                           # bare flag -> true
        "--no-channels-last",                    # --no- flag -> false
        "--download=true",                       # explicit bool
        "--decay-milestones", "[10, 20]",        # list of ints
        "--mix-layers=[0, layer1]",              # list of ints or strings
        "--cutmix_minmax", "[0.2, 0.8]",         # list of floats
        "--clip-grad", "null",                   # None where allowed
        "--model-kwargs", "{stem_stride: 2}",    # dict
        "--mix-kwargs={k: [1, 2]}",
        "--wandb-tags", "baseline",              # a scalar for a list becomes one item
        "--wandb-name", "2024",                  # string keys keep the text as typed
    ])
    assert cfg.lr == 2e-3 and cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)
    assert cfg.epochs == 30 and cfg.model_ema is True and cfg.channels_last is False and cfg.download is True
    assert cfg.decay_milestones == [10, 20] and cfg.mix_layers == [0, "layer1"]
    assert cfg.cutmix_minmax == [0.2, 0.8] and cfg.clip_grad is None
    assert cfg.model_kwargs == {"stem_stride": 2} and cfg.mix_kwargs == {"k": [1, 2]}
    assert cfg.wandb_tags == ["baseline"] and cfg.wandb_name == "2024"


def test_last_override_wins_and_beats_the_file(tmp_path):
    recipe = write(tmp_path / "r.yaml", "seed: 1\n")
    assert load_config(recipe, ["--seed", "2", "--seed=3"]).seed == 3


def test_mapping_overrides():
    assert load_config(None, {"lr": 1, "mix": "mixup"}).lr == 1.0


def test_bare_flag_for_a_value_key_is_an_error():
    assert "--lr needs a value" in error(parse_overrides, ["--lr", "--epochs", "3"])


def test_no_prefix_on_a_non_bool_key():
    assert "true/false" in error(parse_overrides, ["--no-lr"])


def test_positional_argument_is_an_error():
    assert "'oops'" in error(parse_overrides, ["oops"])


def test_unparsable_override_value():
    assert "--mix-layers" in error(parse_overrides, ["--mix-layers", "[0, 1"])


# ------------------------------------------------------------------ unknown keys

def test_unknown_key_in_file_with_alias_suggestion(tmp_path):
    recipe = write(tmp_path / "x.yaml", "learning_rate: 0.1\n")
    message = error(load_config, recipe)
    assert message == f"unknown recipe key 'learning_rate' in {recipe}; did you mean 'lr'?"


def test_unknown_key_in_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "mixup_alpha: 2.0\n")
    message = error(load_config, write(tmp_path / "leaf.yaml", "_base_: base.yaml\n"))
    assert "base.yaml" in message and "leaf.yaml" not in message and "did you mean 'mix_alpha'?" in message


def test_unknown_key_on_the_command_line_with_close_match():
    message = error(load_config, None, ["--warmup-epoch", "3"])
    assert message == "unknown recipe key 'warmup_epoch' on the command line; did you mean 'warmup_epochs'?"


@pytest.mark.parametrize("key, hint", [
    ("amp", "accelerate launch --mixed_precision"),
    ("mixup", "mix: mixup"),
    ("cutmix", "cutmix_alpha"),
    ("model_ema_enable", "did you mean 'model_ema'?"),
    ("nesterov", "opt: sgd"),
    ("zzzz", "TrainConfig"),
])
def test_unknown_key_hints(key, hint):
    assert hint in error(load_config, None, {key: 1})


# ------------------------------------------------------------------ types

@pytest.mark.parametrize("key, value, expected", [
    ("lr", "abc", "expects a float, got 'abc' (str)"),
    ("epochs", 2.5, "expects an int, got 2.5 (float)"),
    ("epochs", True, "expects an int, got True (bool)"),  # bool is not an int
    ("lr", True, "expects a float, got True (bool)"),
    ("pretrained", 1, "expects a bool (true/false), got 1 (int)"),
    ("epochs", None, "expects an int, got None"),  # None only where the annotation allows it
    ("decay_milestones", [10, "x"], "expects a list of ints"),
    ("mix_layers", [0, 1.5], "expects a list of ints or strings or null"),
    ("model_kwargs", [1], "expects a mapping"),
    ("model", 3, "expects a string, got 3 (int)"),
])
def test_wrong_types(tmp_path, key, value, expected):
    recipe = write(tmp_path / "t.yaml", yaml.safe_dump({key: value}))
    message = error(load_config, recipe)
    assert f"recipe key '{key}' {expected}" in message and str(recipe) in message


def test_wrong_type_on_the_command_line():
    message = error(load_config, None, ["--lr", "abc"])
    assert message == "recipe key 'lr' expects a float, got 'abc' (str) on the command line"


@pytest.mark.parametrize("argv, expected", [
    (["--torchcompile"], True), (["--no-torchcompile"], False), (["--torchcompile", "true"], True),
    (["--torchcompile", "aot_eager"], "aot_eager"), (["--torchcompile", "inductor"], "inductor"),
])
def test_torchcompile_takes_timms_bool_or_backend_forms(argv, expected):
    assert load_config(None, argv).torchcompile == expected


def test_torchcompile_rejects_unknown_backends_and_other_types():
    assert "must be true (inductor), false, or a name from torch._dynamo.list_backends()" in error(
        load_config, None, ["--torchcompile", "inductorr"])
    assert "expects a bool (true/false) or a string, got 3 (int)" in error(load_config, None, {"torchcompile": 3})


def test_validate_catches_wrong_types_in_code():
    assert "expects an int" in error(validate, TrainConfig(epochs="3"))
    assert "expects a list of ints" in error(validate, TrainConfig(decay_milestones=50))
    validate(TrainConfig(lr=1))  # an int for a float is fine in code too


# ------------------------------------------------------------------ value checks

@pytest.mark.parametrize("overrides", [
    {"lr": 0}, {"lr": -0.1}, {"smoothing": 1.0}, {"smoothing": -0.1}, {"train_fraction": 0},
    {"train_fraction": 1.5}, {"mix_prob": 1.1}, {"mix_prob": -0.1}, {"mix_alpha": 0}, {"cutmix_alpha": -1},
    {"batch_size": 0}, {"grad_accum_steps": 0}, {"epochs": 0}, {"eval_every": 0}, {"checkpoint_keep": 0},
    {"model_ema_decay": 1.0}, {"model_ema_decay": 0.0}, {"decay_milestones": [20, 10]},
    {"decay_milestones": [10, 10]}, {"decay_milestones": [50, 100], "epochs": 100}, {"decay_milestones": [0]},
    {"sched": "cosin"}, {"label_lam": "floor"}, {"wandb_mode": "on"}, {"opt": "sgdd"}, {"opt": "foo_adamw"},
    {"batch_size": 10, "grad_accum_steps": 4}, {"cutmix_minmax": [0.8, 0.2]}, {"cutmix_minmax": [0.1]},
    {"mix_layer_weights": [1.0], "mix_layers": [0, 1]}, {"mix_layer_weights": [0.0, 0.0]},
    {"mix_layers": []}, {"mix_layers": [-1]}, {"drop_path": 1.0}, {"num_classes": 0}, {"clip_grad": 0},
    {"max_steps": -1}, {"weight_decay": -1e-4}, {"warmup_epochs": -1}, {"eval_last": -1},
    {"bce_target_thresh": 0.2}, {"bce_target_thresh": 1.0, "bce_loss": True},
    {"momentum": 1.0}, {"momentum": 5}, {"seed": -1}, {"seed": 2**40}, {"decay_milestones": [], "sched": "step"},
    {"hflip": 1.5}, {"remode": "noise"}, {"scale": [0.9, 0.1]}, {"train_interpolation": "cubic"}, {"crop_pct": 0.0},
])
def test_out_of_range_values(overrides):
    key = next(iter(overrides))  # the first key is the one at fault
    assert error(load_config, None, overrides).startswith(f"recipe key '{key}' ")


@pytest.mark.parametrize("overrides", [
    {"lr": 1e-6, "smoothing": 0.0, "train_fraction": 1.0, "mix_prob": 0.0, "model_ema_decay": 0.5},
    {"decay_milestones": [1, 99], "epochs": 100}, {"sched": "cosine"}, {"sched": "step", "decay_milestones": [30]},
    {"sched": "none"}, {"momentum": 0.0}, {"seed": 2**31 - 1},
    {"label_lam": "sampled"}, {"wandb_mode": "disabled"}, {"opt": "adamw"}, {"opt": "lookahead_adamw"},
    {"opt": "momentum"}, {"opt": "AdamW"}, {"batch_size": 12, "grad_accum_steps": 4},
    {"cutmix_minmax": [0.0, 1.0]}, {"mix_layers": [0, "layer1"], "mix_layer_weights": [0.0, 2]},
])
def test_in_range_values_pass(overrides):
    load_config(None, overrides)


def test_range_error_names_value_and_source(tmp_path):
    recipe = write(tmp_path / "r.yaml", "smoothing: 1.5\n")
    assert error(load_config, recipe) == f"recipe key 'smoothing' must be in [0, 1), got 1.5 (set in {recipe})"


def test_milestones_beyond_epochs_from_two_sources(tmp_path):
    recipe = write(tmp_path / "r.yaml", "decay_milestones: [100, 150]\n")
    assert "< epochs (120)" in error(load_config, recipe, ["--epochs", "120"])
    assert load_config(recipe, ["--epochs", "200"]).decay_milestones == [100, 150]


# ------------------------------------------------------------------ broken files

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error(load_config, missing) == f"recipe file not found: {missing}"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    recipe = write(tmp_path / "bad.yaml", "lr: 0.1\nepochs: 3\nmix_layers: [0, 1\nseed: 1\n")
    message = error(load_config, recipe)
    assert str(recipe) in message and "cannot parse" in message
    line = int(message.split(" line ")[1].split(":")[0])
    assert line in (3, 4)  # the unclosed list starts on line 3; the parser notices on line 4


def test_duplicate_key_is_an_error(tmp_path):
    message = error(load_config, write(tmp_path / "dup.yaml", "lr: 0.1\nepochs: 3\nlr: 0.2\n"))
    assert "duplicate key 'lr'" in message and "line 3" in message


@pytest.mark.parametrize("text, kind", [("- lr\n- 0.1\n", "list"), ("0.1\n", "float")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    message = error(load_config, write(tmp_path / "l.yaml", text))
    assert f"must be a mapping of `key: value` lines, got a {kind}" in message


# ------------------------------------------------------------------ dump and reload

def test_dump_load_round_trip(tmp_path):
    write(tmp_path / "base.yaml", "epochs: 300\nweight_decay: 5e-4\n")
    recipe = write(tmp_path / "r.yaml", "_base_: base.yaml\nmix: catchup\n")
    cfg = load_config(recipe, [
        "--mix-layers", "[0, 1, layer2]", "--mix-layer-weights", "[1, 2, 3]", "--cutmix-minmax", "[0.25, 0.75]",
        "--decay-milestones", "[100, 200]", "--model-kwargs", "{stem_stride: 2, nested: {a: [1, 2]}}",
        "--wandb-tags", "[a, b]", "--wandb-name", "1e-4", "--dataset", "yes", "--data-dir", "null",
        "--warmup-lr", "1e-7", "--clip-grad", "5",
    ])
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    text = out.read_text()
    assert "_base_" not in text and "mix_layers: [0, 1, layer2]" in text
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line[0] in "# "]
    assert keys == [f.name for f in dataclasses.fields(TrainConfig)]
    again = load_config(out)
    assert again == cfg
    assert again.wandb_name == "1e-4" and again.dataset == "yes" and again.clip_grad == 5.0
    assert config_to_dict(again) == config_to_dict(cfg)


def test_default_round_trip_and_dict(tmp_path):
    dump_config(TrainConfig(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == TrainConfig()
    assert list(config_to_dict(TrainConfig())) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert load_config(None, {"lr": 1, "epochs": 2}) == TrainConfig(lr=1.0, epochs=2)
