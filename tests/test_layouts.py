"""Feature-level mixing on every layout timm models produce: NCHW maps, NHWC maps (``output_fmt``), token maps.

The sweep builds the smallest variant of each timm family (narrowed through timm's own keyword arguments where
the model takes them, small inputs, pretrained=False), forces Catch-up Mix onto each of its layers in turn and
checks, from the stage output captured before and after the mixing hook, that every channel slice on the axis
timm documents for that family comes whole from the sample or from its partner, with floor(lam * C) of them
the sample's own. Token maps are checked over all tokens, prefix tokens (class, distillation, register tokens)
included: a channel is swapped on every token at once.
"""
import math

import pytest
import timm
import torch
from torch import nn

import catchup.models  # noqa: F401  (registers preactresnet18 with timm)
from catchup import CatchupError, build_mixer
from catchup.mix.alignmix import alignmix
from catchup.stages import infer_layout
from tests.model_families import CHANNEL_AXIS, FAMILIES, NUM_CLASSES, create


def inputs(size: int, batch: int = 4):
    g = torch.Generator().manual_seed(size)
    return torch.randn(batch, 3, size, size, generator=g), torch.arange(batch) % NUM_CLASSES


def mix_once(method: str, model: nn.Module, layer, size: int, seed: int, **options):
    """One training forward with ``method`` forced onto ``layer``: (stage output, mixed output, plan, soft target)."""
    x, y = inputs(size)
    mixer = build_mixer(method, model, num_classes=NUM_CLASSES, layers=[layer], input_size=(3, size, size),
                        seed=seed, **options)
    stage = mixer.stages[0]
    module = dict(model.named_modules())[stage.module_name]
    seen = {}
    before = module.register_forward_hook(    # runs before the mixer's hook: the stage's own output
        lambda m, i, o: seen.setdefault("before", o.detach().clone()), prepend=True)
    after = module.register_forward_hook(lambda m, i, o: seen.setdefault("after", o.detach().clone()))
    try:
        model.train()
        with torch.no_grad():
            _, soft = mixer(x, y)
            model(x)
    finally:
        before.remove()
        after.remove()
        mixer.remove()
    return stage, seen["before"], seen["after"], mixer.last_plan, soft, y


def channel_sources(before: torch.Tensor, after: torch.Tensor, index: torch.Tensor, axis: int):
    """Bool [B, C] pairs: channel slices equal to the sample's own only, and to both its own and its partner's.

    Fails if any channel slice equals neither (a mixture, or channels taken along the wrong axis).
    """
    own_map, mixed = before.movedim(axis, 1).flatten(2), after.movedim(axis, 1).flatten(2)
    own = (mixed == own_map).all(-1)
    partner = (mixed == own_map[index]).all(-1)
    assert bool((own | partner).all()), "a channel slice is neither the sample's own nor its partner's"
    return own & ~partner, own & partner


def assert_whole_channels_swapped(before, after, plan, soft, y, layout):
    axis = CHANNEL_AXIS[layout]
    channels = before.shape[axis]
    n_keep = math.floor(plan.lam * channels)
    own_only, both = channel_sources(before, after, plan.index, axis)
    paired = [i for i in range(len(y)) if int(plan.index[i]) != i]
    assert paired, "every sample was its own partner: pick another seed"
    for i in paired:
        assert int(own_only[i].sum()) <= n_keep <= int(own_only[i].sum() + both[i].sum())
    assert plan.lam_eff == n_keep / channels
    one_hot = torch.eye(NUM_CLASSES)[y]
    expected = one_hot * (n_keep / channels) + one_hot[plan.index] * (1 - n_keep / channels)
    assert torch.allclose(soft, expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_catchup_swaps_whole_channels_of_the_right_axis_at_every_layer(family):
    name, kwargs, size, layouts = FAMILIES[family]
    model = create(name, kwargs)
    stages = len(model.feature_info)
    layouts = layouts if isinstance(layouts, list) else [layouts] * stages
    assert len(layouts) == stages
    for k, layout in enumerate(layouts, start=1):
        stage, before, after, plan, soft, y = mix_once("catchup", model, k, size, seed=k + 1)
        assert stage.layout == layout and stage.channels == before.shape[CHANNEL_AXIS[layout]]
        assert_whole_channels_swapped(before, after, plan, soft, y, layout)


@pytest.mark.parametrize("family, layer", [("swin", 2), ("mambaout", 3), ("vit", 2), ("deit", 1), ("levit", 1)])
def test_moex_manifold_and_alignmix_act_on_the_channel_axis(family, layer):
    name, kwargs, size, layout = FAMILIES[family]
    axis = CHANNEL_AXIS[layout]
    model = create(name, kwargs)
    stage, h, after, plan, _, _ = mix_once("moex", model, layer, size, seed=2, prob=1.0)
    # MoEx by hand: each position's mean and std over the channels, swapped for the partner's same position.
    mean, std = h.mean(axis, keepdim=True), (h.var(axis, keepdim=True) + 1e-5).sqrt()
    expected = (h - mean) / std * std[plan.index] + mean[plan.index]
    assert torch.allclose(after, expected, atol=1e-5)
    stage, h, after, plan, _, _ = mix_once("manifold", model, layer, size, seed=2)
    assert torch.allclose(after, plan.lam * h + (1 - plan.lam) * h[plan.index], atol=1e-6)
    # AlignMix aligns positions (rows) described by their channels (features): the channel axis moved to 1
    # is what alignmix() takes; checked against a hand computation in test_baselines
    for seed in (2, 3):     # directions 0 and 1 of the alignment
        stage, h, after, plan, _, _ = mix_once("alignmix", model, layer, size, seed=seed)
        expected = alignmix(h.movedim(axis, 1), plan.index, plan.extras["lam"], plan.extras["direction"])
        assert torch.allclose(after, expected.movedim(1, axis), atol=1e-5)


@pytest.mark.parametrize("name, kwargs, size, problem", [
    ("hrnet_w18_small", {}, 32, "its feature_info names 'stem', which is not a module of the model"),
    ("pit_ti_224", dict(img_size=64), 64, "module 'transformers.0' outputs a tuple, not one feature map"),
    ("coat_lite_tiny", dict(img_size=32), 32, "module 'serial_blocks1' is never called by the forward"),
])
def test_models_whose_stages_cannot_be_hooked_are_refused_when_the_mixer_is_built(name, kwargs, size, problem):
    model = create(name, kwargs)
    with pytest.raises(CatchupError, match=problem) as err:
        build_mixer("catchup", model, num_classes=NUM_CLASSES, input_size=(3, size, size))
    message = str(err.value)
    assert f"model {name}" in message and "mix_layers" in message and "\n" not in message


def test_one_unhookable_feature_info_entry_refuses_only_the_layers_that_use_it():
    model = timm.create_model("preactresnet18", width=4, num_classes=NUM_CLASSES)
    info = [dict(e) for e in model.feature_info]
    info[2]["module"] = "stages.9"          # layer 3 (the third entry) names a module the model lacks
    model.feature_info = info
    size = dict(input_size=(3, 32, 32), num_classes=NUM_CLASSES)
    assert [s.module_name for s in build_mixer("alignmix", model, **size).stages] == [None, "stages.3"]
    assert [s.module_name for s in build_mixer("moex", model, **size).stages] == ["stem"]
    assert [s.module_name for s in build_mixer("catchup", model, layers=[0, 1, 4], **size).stages] == [
        None, "stem", "stages.2"]
    with pytest.raises(CatchupError, match="names 'stages.9', which is not a module"):
        build_mixer("catchup", model, **size)                  # every layer: the bad one among them
    with pytest.raises(CatchupError, match="names 'stages.9', which is not a module"):
        build_mixer("catchup", model, layers=[3], **size)


def test_the_named_fix_mixes_a_refused_model():
    model = create("hrnet_w18_small", {})
    for k, module in enumerate(["act2", "layer1", "stage2.0.branches.1"], start=1):
        stage, before, after, plan, soft, y = mix_once("catchup", model, module, 32, seed=k + 1)
        assert stage.layout == "NCHW"
        assert_whole_channels_swapped(before, after, plan, soft, y, "NCHW")


def test_a_flat_output_is_refused():
    model = create("resnet10t", {})
    with pytest.raises(CatchupError, match=r"module 'global_pool' outputs a tensor of shape \(1, 512\), not a "
                                           r"feature map.*mix_layers"):
        build_mixer("catchup", model, num_classes=NUM_CLASSES, layers=["global_pool"], input_size=(3, 32, 32))


def test_a_probe_at_a_size_the_model_cannot_take_is_a_one_line_error():
    name, kwargs, _, _ = FAMILIES["vit"]
    model = create(name, kwargs)                  # built for 32 px
    with pytest.raises(CatchupError, match=r"model vit_tiny_patch16_224 failed a forward at input_size "
                                           r"\(3, 64, 64\) .*pass the size it takes as input_size") as err:
        build_mixer("catchup", model, num_classes=NUM_CLASSES, input_size=(3, 64, 64))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shape, channels, declared, layout", [
    ((1, 8, 5, 5), 8, None, "NCHW"),
    ((1, 5, 5, 8), 8, None, "NHWC"),       # the channel count finds the axis even where output_fmt is silent
    ((1, 8, 5, 8), 8, None, "NCHW"),       # both axes fit: timm's default
    ((1, 8, 5, 8), 8, "NHWC", "NHWC"),     # both fit: the model's output_fmt decides
    ((1, 6, 6, 4), None, "NHWC", "NHWC"),  # a named module outside feature_info: the output_fmt
    ((1, 6, 6, 4), None, None, "NCHW"),
    ((1, 17, 8), 8, None, "NLC"),
    ((1, 8, 17), 8, None, "NCL"),
    ((1, 8, 8), 8, None, "NLC"),
])
def test_layout_rules(shape, channels, declared, layout):
    assert infer_layout(shape, channels, declared) == layout


@pytest.mark.parametrize("shape, channels, message", [
    ((1, 5, 5, 5), 8, r"no axis of the 8 channels"),
    ((1, 8), 8, r"not a feature map"),
    ((1, 2, 8, 5, 5), 8, r"not a feature map"),
])
def test_layout_refusals(shape, channels, message):
    with pytest.raises(CatchupError, match=message):
        infer_layout(shape, channels)


class ChannelsLastNet(nn.Module):
    """A custom model with NHWC stages and no pretrained_cfg: its layout is read from the first mixed output."""
    output_fmt = "NHWC"

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stage = nn.Sequential(nn.Linear(6, 5), nn.GELU())     # per-position MLP on NHWC maps
        self.head = nn.Linear(5, NUM_CLASSES)
        self.feature_info = [dict(module="stage", num_chs=5, reduction=1)]

    def forward(self, x):
        return self.head(self.stage(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_a_model_without_input_size_learns_its_layout_from_the_first_batch():
    model = ChannelsLastNet()
    mixer = build_mixer("catchup", model, num_classes=NUM_CLASSES, layers=[1], seed=3)
    assert mixer.stages[0].layout is None                 # nothing to probe with yet
    seen = {}
    x, y = inputs(7)
    _, soft = mixer(x, y)
    assert mixer.stages[0].layout == "NHWC"               # probed at the batch's size
    model.stage.register_forward_hook(lambda m, i, o: seen.update(before=o.detach().clone()), prepend=True)
    model.stage.register_forward_hook(lambda m, i, o: seen.update(after=o.detach().clone()))
    model.train()
    model(x)
    assert_whole_channels_swapped(seen["before"], seen["after"], mixer.last_plan, soft, y, "NHWC")


def test_filter_influence_norms_over_every_position_axis():
    from catchup.mix.catchup import filter_influence
    h = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    by_hand = torch.tensor([[math.sqrt(sum(float(v) ** 2 for v in h[b, c].flatten())) for c in range(5)]
                            for b in range(3)])
    by_hand = by_hand / by_hand.sum(1, keepdim=True)
    tokens = h.flatten(2)                                    # what a token map [B, N, C] is seen as
    for view in (h, tokens, tokens[..., None], h.contiguous(memory_format=torch.channels_last)):
        assert torch.allclose(filter_influence(view), by_hand)
    half = filter_influence((tokens * 300).half())           # squares overflow in fp16: 300^2 * 24 > 65504
    assert half.dtype == torch.float32 and torch.allclose(half, by_hand, atol=1e-3)
