"""The CIFAR / Tiny-ImageNet model zoo: timm registration, feature_info, the classifier interface, param counts."""
from typing import Dict, List

import pytest
import timm
import torch
from timm.data import resolve_data_config

import catchup.models  # noqa: F401  (registers the models with timm)
from catchup.errors import CatchupError
from catchup.models import MODEL_NAMES

# Narrow (and for the deepest nets, shallower) variants keep every test fast; full sizes are counted on 'meta'.
SMALL: Dict[str, dict] = {
    "preactresnet18": dict(width=8),
    "preactresnet34": dict(width=8),
    "preactresnet50": dict(width=8),
    "resnet18_cifar": dict(width=8),
    "resnext50_cifar": dict(width=16, layers=(1, 1, 1, 1)),
    "wrn16_8": dict(width=2),
    "wrn28_10": dict(width=2),
    "pyramidnet": dict(depth=11, alpha=12, width=8),
    "pyramidnet200": dict(depth=20, alpha=24, width=8),
    "vgg16_bn_cifar": dict(width=8),
    "mobilenetv2_cifar": dict(width=8),
    "densenet121_cifar": dict(width=4, block_config=(1, 2, 3, 2)),
}
NUM_CLASSES = 7


def small_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{"num_classes": NUM_CLASSES, **SMALL[name], **kwargs}).eval()


def images(batch: int = 2, chans: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_model_is_registered_and_tested():
    assert set(MODEL_NAMES) <= set(timm.list_models())
    assert set(SMALL) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_feature_info_modules_output_the_stated_maps(name):
    model = small_model(name)
    modules = dict(model.named_modules())
    info = model.feature_info
    assert len(info) in (4, 5)
    seen: Dict[str, torch.Size] = {}
    for f in info:
        assert f["module"] in modules, f["module"]
        modules[f["module"]].register_forward_hook(lambda m, i, o, key=f["module"]: seen.__setitem__(key, o.shape))
    for size in (32, 64):  # 64 px: Tiny-ImageNet inputs through the same fully convolutional net
        out = model(images(size=size))
        assert out.shape == (2, NUM_CLASSES)
        for f in info:
            assert seen[f["module"]] == (2, f["num_chs"], size // f["reduction"], size // f["reduction"]), f
    assert [f["reduction"] for f in info] == sorted(f["reduction"] for f in info)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_stage_output_is_all_that_flows_onward(name):
    """Replacing a feature module's output through a hook (feature-level mixing) must drive the rest of the net:
    swapping in the features of other images gives exactly those images' logits, zeroing them changes the logits."""
    model = small_model(name)
    x1, x2 = images(seed=1), images(seed=2)
    modules = dict(model.named_modules())
    with torch.no_grad():
        out1, out2 = model(x1), model(x2)
        for f in model.feature_info:
            module = modules[f["module"]]
            captured: List[torch.Tensor] = []
            handle = module.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
            model(x2)
            handle.remove()
            handle = module.register_forward_hook(lambda m, i, o: captured[0])
            swapped = model(x1)
            handle.remove()
            handle = module.register_forward_hook(lambda m, i, o: o * 0)
            zeroed = model(x1)
            handle.remove()
            torch.testing.assert_close(swapped, out2, msg=f["module"])
            assert not torch.allclose(zeroed, out1), f["module"]
    assert not torch.allclose(out1, out2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grayscale_input(name):
    model = small_model(name, in_chans=1)
    first_conv = dict(model.named_modules())[model.pretrained_cfg["first_conv"]]
    assert first_conv.in_channels == 1
    assert model(images(chans=1)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_classifier_interface(name):
    model = small_model(name)
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.num_classes == NUM_CLASSES
    assert model.get_classifier() is dict(model.named_modules())[model.pretrained_cfg["classifier"]]
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_only(name):
    model = timm.create_model(name, features_only=True, **SMALL[name])
    feats = model(images())
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [32 // f.shape[-1] for f in feats] == model.feature_info.reduction()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_matches_contiguous(name):
    model = small_model(name)
    x = images()
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grad_checkpointing_is_real(name):
    """Same outputs and gradients, stage modules bypassed (their hooks do not fire: callers must refuse that)."""
    model = small_model(name).train()
    x = images(batch=4)
    stage_module = dict(model.named_modules())[model.feature_info[-1]["module"]]
    calls = []
    stage_module.register_forward_hook(lambda m, i, o: calls.append(1))

    def run() -> tuple:
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    out, grads = run()
    assert len(calls) == 1
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["preactresnet18", "pyramidnet", "mobilenetv2_cifar", "resnet18_cifar"])
def test_torch_compile_full_graph(name):
    model = small_model(name)
    x = images()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_drop_rates_act_in_training_only():
    model = small_model("preactresnet18", drop_rate=0.5, drop_path_rate=0.2)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))
    assert model.stages[-1][-1].drop_path.drop_prob == pytest.approx(0.2)
    with pytest.raises(CatchupError, match="drop_path_rate"):
        timm.create_model("vgg16_bn_cifar", drop_path_rate=0.1)


def test_wrn_block_dropout():
    model = small_model("wrn16_8", block_drop_rate=0.3).train()
    with torch.no_grad():
        assert not torch.allclose(model(images()), model(images()))


def test_tiny_imagenet_stride2_stem():
    model = small_model("preactresnet18", stem_stride=2)
    assert [f["reduction"] for f in model.feature_info] == [2, 2, 4, 8, 16]
    assert model.forward_features(images(size=64)).shape == (2, 64, 4, 4)
    with pytest.raises(CatchupError, match="stem_stride"):
        timm.create_model("preactresnet18", stem_stride=4)


@pytest.mark.parametrize("name, kwargs, match", [
    ("wrn16_8", dict(depth=15), "6n \\+ 4"),
    ("pyramidnet", dict(depth=12), "9n \\+ 2"),
    ("pyramidnet", dict(depth=13, bottleneck=False), "6n \\+ 2"),
    ("resnet18_cifar", dict(width=7), "even"),
])
def test_bad_architecture_arguments(name, kwargs, match):
    with pytest.raises(CatchupError, match=match):
        timm.create_model(name, **kwargs)


def meta_param_count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


# Exact counts of the reference implementations, rounded counts of the papers:
# - PreActResNet-18 (Manifold Mixup / PuzzleMix code, final BN): 11,172,170 at 10 classes, "11.2M".
# - WRN-28-10: 36,479,194 at 10 classes (osmr/imgclsmob CIFAR-10 table); 36.5M in Zagoruyko & Komodakis (2016).
# - WRN-16-8: 10,961,370 at 10 classes; 11.0M in Zagoruyko & Komodakis (2016).
# - PyramidNet-200, alpha 240, bottleneck: 26,844,952 at 100 classes (osmr/imgclsmob CIFAR-100 table);
#   26.8M in the CutMix paper (Yun et al., 2019) CIFAR-100 table.
# - kuangliu/pytorch-cifar at 10 classes: ResNet18 11,173,962, VGG16 14,728,266, MobileNetV2 2,296,922,
#   DenseNet121 6,956,298.
@pytest.mark.parametrize("name, num_classes, exact, published", [
    ("preactresnet18", 10, 11_172_170, 11.2e6),
    ("wrn28_10", 10, 36_479_194, 36.5e6),
    ("wrn16_8", 10, 10_961_370, 11.0e6),
    ("pyramidnet200", 100, 26_844_952, 26.8e6),
    ("resnet18_cifar", 10, 11_173_962, 11.2e6),
    ("vgg16_bn_cifar", 10, 14_728_266, 14.7e6),
    ("mobilenetv2_cifar", 10, 2_296_922, 2.3e6),
    ("densenet121_cifar", 10, 6_956_298, 7.0e6),
])
def test_param_counts_match_the_published_architectures(name, num_classes, exact, published):
    count = meta_param_count(name, num_classes=num_classes)
    assert count == exact
    assert round(count / 1e5) == round(published / 1e5)


def test_param_counts_at_cifar100_and_stride2_stem():
    # 100 classes add 90 * (512 + 1) classifier weights to the 10-class PreActResNet-18.
    assert meta_param_count("preactresnet18") == 11_172_170 + 90 * 513
    assert meta_param_count("preactresnet18", stem_stride=2) == meta_param_count("preactresnet18")
    assert meta_param_count("pyramidnet", depth=200, alpha=240) == 26_844_952


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pretrained_weights_are_a_clear_error(name):
    with pytest.raises(CatchupError, match="no published pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_pretrained_from_a_local_file(tmp_path):
    source = small_model("preactresnet18", num_classes=100)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = timm.create_model("preactresnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               **SMALL["preactresnet18"])
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_data_config_is_cifar():
    model = small_model("preactresnet18")
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == (0.5071, 0.4865, 0.4409) and cfg["std"] == (0.2673, 0.2564, 0.2762)
    assert timm.create_model("wrn16_8", width=2).num_classes == 100  # the cfg's default
