"""The mixer interface, the plan/hook contract, and every method on real timm models."""

import pytest
import timm
import torch
from torch import nn

from catchup import CatchupError, build_mixer
from catchup.mix import moex
from catchup.mix.plan import MixPlan
from tests.helpers import HeadNet, TinyNet, reference_catchup


class SharedStageNet(TinyNet):
    """Calls its stage 'b2' twice in one forward."""

    def __init__(self):
        super().__init__()
        self.b2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return self.fc(self.c(self.b2(self.b2(self.b(self.a(x))))).mean((2, 3)))


def record_applications(mixer):
    """The layers at which the stage hook applied a plan, in order."""
    calls, inner = [], mixer.hooks.mix_fn

    def counting(h, plan):
        calls.append(plan.layer)
        return inner(h, plan)

    mixer.hooks.mix_fn = counting
    return calls


def batch(b=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.arange(b) % 5


def test_every_training_step_applies_one_plan_at_its_layer():
    model = TinyNet()
    seen = []
    for name in ("a", "b", "c"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.append((name, o.clone())))
    mixer = build_mixer("catchup", model, num_classes=5, seed=3)
    calls = record_applications(mixer)
    x, y = batch()
    layers = []
    for _ in range(40):
        seen.clear()
        calls.clear()
        _, _, plan = mixer.prepare(x, y)
        mixer.arm(plan)
        model(x)
        layers.append(plan.layer)
        assert calls == ([plan.layer] if plan.layer > 0 else [])
        assert mixer.hooks.plan is None           # disarmed after the forward
    assert set(layers) == {0, 1, 2, 3}            # uniform over the input and the three stages


def test_hook_fires_at_most_once_per_forward_even_if_the_stage_runs_twice():
    model = SharedStageNet()
    mixer = build_mixer("catchup", model, num_classes=5, layers=["b2"], input_size=(3, 8, 8))
    calls = record_applications(mixer)
    x, y = batch()
    mixer(x, y)
    model(x)
    assert calls == [1]


def test_never_fires_in_eval_or_on_an_ema_copy():
    model = TinyNet()
    mixer = build_mixer("catchup", model, num_classes=5, layers=[2])
    calls = record_applications(mixer)
    x, y = batch()
    model.eval()
    clean = model(x)
    mixer(x, y)
    assert torch.equal(model(x), clean) and calls == []
    model.train()
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    ema.module.train()                            # even in train mode the copy's hooks are not armed
    mixer(x, y)
    ema.module(x)
    assert calls == []
    model(x)
    assert calls == [1]       # plan layers number the mixer's own layer list: 0 = input, 1 = 'b' here


@pytest.mark.parametrize("layer", ["b", "c"])
def test_catchup_hook_mixes_the_stage_output_as_the_reference_does(layer):
    # The next stage must receive exactly the slow reference's mix of the stage output with the plan's own
    # partners and lambda: a hook mixing with other partners than the soft target's, or other channels, fails.
    model = TinyNet()
    captured = {}
    stage, after = getattr(model, layer), model.c if layer == "b" else model.fc
    # registered before the mixer's hook, so this sees the unmixed output
    stage.register_forward_hook(lambda m, i, o: captured.update({"out": o.detach().clone()}))
    after.register_forward_pre_hook(lambda m, inp: captured.update({"in": inp[0].detach().clone()}))
    mixer = build_mixer("catchup", model, num_classes=5, layers=[layer], seed=2)
    x, y = batch()
    for _ in range(3):
        _, soft, plan = mixer.prepare(x, y)
        assert plan.index.tolist() != list(range(6))    # the seed pairs some samples with others
        mixer.arm(plan)
        out = model(x)
        expected, lam_eff = reference_catchup(captured["out"], plan.index, plan.lam)
        if layer == "b":
            assert torch.equal(captured["in"].double(), expected)
        else:     # 'c' feeds the pooled head: compare the mean over positions the head receives
            assert torch.allclose(captured["in"].double(), expected.mean((2, 3)), atol=1e-6)
        assert plan.lam_eff == lam_eff
        assert torch.allclose(soft, torch.eye(5)[y] * lam_eff + torch.eye(5)[y[plan.index]] * (1 - lam_eff))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", ["mixup", "cutmix", "manifold", "moex", "catchup"])
def test_soft_targets_sum_to_one_and_weight_the_source_by_lam_eff(name, smoothing):
    model = TinyNet()
    mixer = build_mixer(name, model, num_classes=5, label_smoothing=smoothing, seed=1, prob=1.0)
    x, y = batch(b=5)        # labels 0..4: every partner of another sample has a different class
    for _ in range(20):
        _, target, plan = mixer.prepare(x, y)
        assert torch.allclose(target.sum(1), torch.ones(5))
        for i in range(5):
            j = int(plan.index[i])
            own = plan.lam_eff * (1 - smoothing) + smoothing / 5
            if j == i:
                own = 1 - smoothing + smoothing / 5
            assert target[i, y[i]].item() == pytest.approx(own)
            if j != i:
                assert target[i, y[j]].item() == pytest.approx((1 - plan.lam_eff) * (1 - smoothing) + smoothing / 5)


def test_catchup_label_weight_is_the_exact_kept_share_unless_sampled_is_asked():
    model = TinyNet()
    exact = build_mixer("catchup", model, num_classes=5, layers=["c"], seed=0)
    sampled = build_mixer("catchup", TinyNet(), num_classes=5, layers=["c"], seed=0, label_lam="sampled")
    x, y = batch()
    for _ in range(10):
        _, _, p = exact.prepare(x, y)
        _, _, q = sampled.prepare(x, y)
        assert p.lam == q.lam
        assert p.lam_eff == int(p.lam * 8) / 8 and q.lam_eff == q.lam


def test_cutmix_label_weight_is_the_kept_area():
    mixer = build_mixer("cutmix", num_classes=5, seed=0)
    x, y = batch(size=10)
    for _ in range(10):
        mixed, _, plan = mixer.prepare(x, y)
        own = (mixed == x).all(1)                   # pixels that still hold the sample's own values
        assert own.float().mean((1, 2))[plan.index != torch.arange(6)].allclose(torch.tensor(plan.lam_eff))


def test_mixup_and_manifold_interpolate():
    x, y = batch()
    mixer = build_mixer("mixup", num_classes=5, seed=0)
    mixed, _, plan = mixer.prepare(x, y)
    assert torch.allclose(mixed, plan.lam * x + (1 - plan.lam) * x[plan.index])
    model = TinyNet()
    captured = {}
    # (registered before the mixer's hook, so "b" is the unmixed output; update() returns None, and a hook
    # returning a tensor would replace the module's output)
    model.c.register_forward_pre_hook(lambda m, inp: captured.update({"in": inp[0].clone()}))
    model.b.register_forward_hook(lambda m, i, o: captured.update({"b": o.clone()}))
    manifold = build_mixer("manifold", model, num_classes=5, layers=["b"])
    _, _, plan = manifold.prepare(x, y)
    manifold.arm(plan)
    model(x)
    b = captured["b"]
    assert torch.allclose(captured["in"], plan.lam * b + (1 - plan.lam) * b[plan.index], atol=1e-6)


def test_moex_exchanges_positional_moments():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, 4, generator=g)
    index = torch.tensor([2, 0, 1])
    out = moex(h, index)
    for i in range(3):
        j = int(index[i])
        for yy in range(4):
            for xx in range(4):
                v, w = h[i, :, yy, xx].double(), h[j, :, yy, xx].double()
                expected = (v - v.mean()) / (v.var() + 1e-5).sqrt() * (w.var() + 1e-5).sqrt() + w.mean()
                assert torch.allclose(out[i, :, yy, xx].double(), expected, atol=1e-5)


def test_prob_zero_and_disabled_give_plain_targets():
    x, y = batch()
    for mixer in (build_mixer("catchup", TinyNet(), num_classes=5, prob=0.0),
                  build_mixer("none", num_classes=5)):
        out, target, plan = mixer.prepare(x, y)
        assert plan is None and torch.equal(out, x) and torch.equal(target, nn.functional.one_hot(y, 5).float())
    mixer = build_mixer("cutmix", num_classes=5)
    mixer.enabled = False
    assert mixer.prepare(x, y)[2] is None


def test_odd_batches_and_a_batch_of_one():
    # A lone sample can only be its own partner: mixing must leave its input, features and label as they are.
    # Larger odd batches pair through a permutation, and the soft target follows the plan's partners.
    model = TinyNet()
    mixer = build_mixer("catchup", model, num_classes=5, seed=5)
    for b in (1, 3, 7):
        x, y = batch(b=b)
        with torch.no_grad():
            clean = model(x)
        layers = set()
        for _ in range(8):
            xm, target = mixer(x, y)
            out = model(xm)
            plan = mixer.last_plan
            layers.add(plan.layer)
            assert sorted(plan.index.tolist()) == list(range(b)) and out.shape == (b, 5)
            one_hot = torch.eye(5)[y]
            assert torch.allclose(target, one_hot * plan.lam_eff + one_hot[plan.index] * (1 - plan.lam_eff))
            if b == 1:
                assert torch.equal(xm, x) and torch.allclose(out, clean) and torch.equal(target, one_hot)
        assert len(layers) > 1


def test_collate_carries_the_plan_to_the_model():
    model = TinyNet()
    mixer = build_mixer("catchup", model, num_classes=5, layers=["b"])
    samples = [(torch.randn(3, 8, 8), i % 5) for i in range(4)]
    x, target = mixer.collate(samples)
    plan = x.mix_plan
    assert isinstance(plan, MixPlan) and plan.layer == 1 and target.shape == (4, 5)
    assert mixer.hooks.plan is None                # collate never arms (it runs in worker processes)
    calls = record_applications(mixer)
    model(x.to("cpu"))                             # the model's pre-hook takes the plan off the input
    assert calls == [1]


def test_layer_weights_pick_layers():
    mixer = build_mixer("catchup", TinyNet(), num_classes=5, layer_weights=[0, 0, 1, 0])
    x, y = batch()
    assert {mixer.prepare(x, y)[2].layer for _ in range(10)} == {2}


@pytest.mark.parametrize("name,kwargs,message", [
    ("catchup", dict(alpha=0.0), "alpha must be > 0"),
    ("catchup", dict(alpha=-1.0), "alpha must be > 0"),
    ("catchup", dict(cutmix_alpha=0.0), "cutmix_alpha"),
    ("catchup", dict(prob=1.5), "prob must be in"),
    ("catchup", dict(prob=-0.1), "prob must be in"),
    ("catchup", dict(label_smoothing=1.0), "label_smoothing"),
    ("catchup", dict(label_lam="mean"), "label_lam"),
    ("catchup", dict(layers=["nope"]), "does not have"),
    ("catchup", dict(layers=[9]), "out of range"),
    ("catchup", dict(layers=[]), "empty"),
    ("catchup", dict(layer_weights=[1, 2]), "entries"),
    ("catchup", dict(cutmix_minmax=[0.5, 0.2]), "cutmix_minmax"),
    ("catchup", dict(unknown_option=1), "unknown_option"),
    ("saliencymix", dict(detector="sift"), "detector"),
    ("resizemix", dict(scale=[0.9, 0.1]), "scale"),
    ("resizemix", dict(mode="cubic"), "mode"),
    ("alignmix", dict(eps=0.0), "eps"),
    ("alignmix", dict(cost="l1"), "cost"),
    ("recursivemix", dict(alpha=1.5), "area share"),
    ("recursivemix", dict(omega=-1.0), "omega"),
    ("alignmix", dict(layers=[7]), "out of range"),
    ("snapmix", dict(layers=[1]), "only the input"),
])
def test_bad_options_are_one_line_errors(name, kwargs, message):
    with pytest.raises(CatchupError, match=message) as err:
        build_mixer(name, HeadNet(), num_classes=5, **kwargs)
    assert "\n" not in str(err.value)


def test_unknown_method_and_models_without_feature_info():
    with pytest.raises(CatchupError, match="did you mean 'catchup'"):
        build_mixer("catchupp", TinyNet(), num_classes=5)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(CatchupError, match="no timm feature_info"):
        build_mixer("catchup", plain, num_classes=5)
    mixer = build_mixer("catchup", plain, num_classes=5, layers=[0, "1"], input_size=(3, 8, 8))
    assert [s.channels for s in mixer.stages] == [None, 4]       # channels probed with one forward
    with pytest.raises(CatchupError, match="only the input"):
        build_mixer("cutmix", TinyNet(), num_classes=5, layers=[1])


TIMM_MODELS = {
    "resnet18": ["act1", "layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["act1", "layer1", "layer2", "layer3", "layer4"],
    "resnetv2_50": ["stem.conv", "stages.0", "stages.1", "stages.2", "stages.3"],
    "densenet121": ["features.norm0", "features.denseblock1", "features.denseblock2", "features.denseblock3",
                    "features.norm5"],
    "vgg16_bn": ["features.5", "features.12", "features.22", "features.32", "features.42", "features.43"],
    "mobilenetv2_100": ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
    "wide_resnet50_2": ["act1", "layer1", "layer2", "layer3", "layer4"],
    "resnext50_32x4d": ["act1", "layer1", "layer2", "layer3", "layer4"],
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_works_unchanged_on_timm_cnns(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4)
    mixer = build_mixer("catchup", model, num_classes=4, seed=0)
    calls = record_applications(mixer)
    assert [s.module_name for s in mixer.stages[1:]] == TIMM_MODELS[name]
    x = torch.randn(2, 3, 32, 32)
    index = torch.tensor([1, 0])
    model.train()
    for k, stage in enumerate(mixer.stages[1:], start=1):
        captured = {}
        module = dict(model.named_modules())[stage.module_name]
        handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
        mixer.arm(MixPlan(k, 0.5, index, 0.5, {"n_keep": torch.tensor(stage.channels // 2)}))
        last = k == len(mixer.stages) - 1
        with torch.set_grad_enabled(last):       # one backward (through the deepest layer) keeps this quick
            out = model(x)
        handle.remove()
        assert calls[-1] == k and captured["out"].shape[1] == stage.channels
        if last:
            out.sum().backward()
            assert model.get_classifier().weight.grad is not None


def test_plain_torch_compile_makes_one_graph_per_mixing_layer_and_none_per_step():
    # A model compiled as a whole with torch.compile (no catchup.compile) sees the hook's mixing as part of its
    # forward: one graph without feature mixing plus one per feature layer, all made during the first steps. The
    # mask never changes shapes, so new lambdas and partners at a layer already compiled add none.
    import torch._dynamo
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = TinyNet()
    mixer = build_mixer("catchup", model, num_classes=5, seed=0)
    compiled = torch.compile(model, backend=counting_backend)
    x, y = batch()
    layers = []
    for _ in range(30):
        xm, target = mixer(x, y)
        layers.append(mixer.hooks.plan.layer if mixer.hooks.plan else 0)
        compiled(xm).sum().backward()
        if len(set(layers)) < 4:
            first_seen = len(layers)
    assert set(layers) == {0, 1, 2, 3} and first_seen < 20      # later steps revisit every layer
    assert len(graphs) == 4, f"{len(graphs)} graphs for 4 layers"
    torch._dynamo.reset()
