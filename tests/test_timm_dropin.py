"""The mixer as a drop-in for timm: ``timm.data.Mixup`` in timm's training loop, and ``FastCollateMixup`` as the
collate_fn of ``timm.data.create_loader`` (prefetcher on and off, worker processes on and off).

Mixed inputs, features and targets are checked against independent computations from the plan (convex
combinations written out, Catch-up Mix's slow reference), and against timm's own Mixup where the two must agree.
"""
import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import FastCollateMixup, Mixup, create_loader
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from catchup import CatchupError, build_mixer
from catchup.mix import PlannedBatch
from tests.helpers import TinyNet, reference_catchup

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 5


def mixup_args(**overrides):
    """The dict timm's train.py builds from its flags (here --mixup 0.8 --cutmix 1.0 --smoothing 0.1)."""
    args = dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch",
                label_smoothing=0.1, num_classes=NUM_CLASSES)
    args.update(overrides)
    return args


def smoothed(y, smoothing=0.1):
    return torch.nn.functional.one_hot(y, NUM_CLASSES).float() * (1 - smoothing) + smoothing / NUM_CLASSES


def batches(n=6, b=8, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (b,), generator=g))
            for _ in range(n)]


def timm_train_loop(model, loader, mixup_fn, epochs=2, mixup_off_epoch=0):
    """timm's train.py loop, reduced to its mixing contract (train_one_epoch with the prefetcher off)."""
    loss_fn = SoftTargetCrossEntropy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = []
    for epoch in range(epochs):
        if mixup_off_epoch and epoch >= mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        model.train()
        for input, target in loader:
            clean_input, clean_target = input.clone(), target.clone()
            input, target = mixup_fn(input, target)
            output = model(input)
            loss = loss_fn(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(dict(epoch=epoch, clean=(clean_input, clean_target), input=input, target=target,
                              loss=loss.item(), plan=getattr(mixup_fn, "last_plan", None)))
    return steps


@pytest.mark.parametrize("name,mode", [("mixup", "batch"), ("cutmix", "batch"), ("catchup", "batch"),
                                       ("mixup", "elem"), ("cutmix", "pair")])
def test_timm_training_loop_with_build_mixer_in_place_of_timm_mixup(name, mode):
    data = batches()
    args = mixup_args(mode=mode)
    reference = timm_train_loop(TinyNet(), copy.deepcopy(data), Mixup(**args), mixup_off_epoch=1)
    model = TinyNet()
    ours = timm_train_loop(model, copy.deepcopy(data), build_mixer(name, model, **args), mixup_off_epoch=1)
    assert len(ours) == len(reference) == 12
    for step, timm_step in zip(ours, reference):
        (x, y), plan = step["clean"], step["plan"]
        assert math.isfinite(step["loss"]) and step["target"].shape == (8, NUM_CLASSES)
        assert torch.allclose(step["target"].sum(1), torch.ones(8))
        if step["epoch"] >= 1:     # after timm's mixup-off switch both give the clean batch and smoothed labels
            assert plan is None and torch.equal(step["input"], x)
            assert torch.allclose(step["target"], timm_step["target"])
            continue
        own = smoothed(y)
        weight = plan.own_weight[:, None] if mode != "batch" else plan.lam_eff
        expected = own * weight + own[plan.index] * (1 - weight)
        assert torch.allclose(step["target"], expected, atol=1e-6)
        if mode != "batch":
            continue        # per-sample mixing: see test_per_sample_and_per_pair_modes_of_the_input_methods
        if plan.layer > 0:
            assert torch.equal(step["input"], x)
        elif plan.extras["input_mix"] == "mixup":
            assert torch.allclose(step["input"], plan.lam * x + (1 - plan.lam) * x[plan.index], atol=1e-6)
        else:        # CutMix: every pixel is the sample's or its partner's, the partner's share is 1 - lam_eff
            own_px = (step["input"] == x).all(1)
            partner_px = (step["input"] == x[plan.index]).all(1)
            assert bool((own_px | partner_px).all())
            moved = (~own_px).float().mean((1, 2))
            changed = plan.index != torch.arange(8)
            assert torch.allclose(moved[changed], torch.full_like(moved[changed], 1 - plan.lam_eff))


def test_switch_prob_chooses_cutmix_or_mixup_at_the_input_as_timm_does():
    x, y = batches(1)[0]
    for switch_prob, expected in ((0.0, {"mixup"}), (1.0, {"cutmix"})):
        mixer = build_mixer("mixup", None, **mixup_args(switch_prob=switch_prob))
        assert {mixer.prepare(x, y)[2].extras["input_mix"] for _ in range(20)} == expected
    mixer = build_mixer("cutmix", None, **mixup_args(switch_prob=0.5))
    kinds = [mixer.prepare(x, y)[2].extras["input_mix"] for _ in range(400)]
    assert 0.4 < kinds.count("cutmix") / len(kinds) < 0.6
    # only one alpha on: that mix only, whatever switch_prob (timm's --cutmix 1.0 alone, --mixup 0.8 alone)
    cut_only = build_mixer("mixup", None, **mixup_args(mixup_alpha=0.0, switch_prob=0.5))
    assert {cut_only.prepare(x, y)[2].extras["input_mix"] for _ in range(20)} == {"cutmix"}
    mix_only = build_mixer("cutmix", None, **mixup_args(cutmix_alpha=0.0, switch_prob=0.5))
    assert {mix_only.prepare(x, y)[2].extras["input_mix"] for _ in range(20)} == {"mixup"}
    # without switch_prob (the project's recipes) each method keeps its own input mix
    assert {build_mixer("mixup", None, num_classes=5).prepare(x, y)[2].extras["input_mix"]
            for _ in range(20)} == {"mixup"}


def test_timm_args_map_onto_the_method():
    model = TinyNet()
    mixer = build_mixer("catchup", model, **mixup_args(mixup_alpha=0.3, prob=0.25, label_smoothing=0.2))
    assert (mixer.alpha, mixer.prob, mixer.label_smoothing, mixer.num_classes) == (0.3, 0.25, 0.2, NUM_CLASSES)
    assert build_mixer("catchup", model).num_classes == NUM_CLASSES        # num_classes from the model
    minmax = build_mixer("cutmix", None, **mixup_args(cutmix_alpha=0.0, mixup_alpha=0.0, cutmix_minmax=[0.3, 0.6]))
    x, y = batches(1)[0]
    for _ in range(10):
        plan = minmax.prepare(x, y)[2]
        assert plan.extras["input_mix"] == "cutmix" and 1 - 0.6 ** 2 - 1e-9 <= plan.lam_eff <= 1 - 0.3 ** 2 + 0.1


def test_mixup_enabled_is_the_off_switch_and_enabled_its_alias():
    x, y = batches(1)[0]
    mixer = build_mixer("cutmix", None, **mixup_args())
    mixer.mixup_enabled = False
    out, target = mixer(x, y)
    timm_mixup = Mixup(**mixup_args())
    timm_mixup.mixup_enabled = False
    timm_out, timm_target = timm_mixup(x.clone(), y)
    assert mixer.enabled is False and torch.equal(out, timm_out) and torch.allclose(target, timm_target)
    assert mixer.state_dict() == {"calls": 1, "enabled": False}
    mixer.enabled = True
    assert mixer.mixup_enabled is True and mixer.prepare(x, y)[2] is not None
    mixer.load_state_dict({"calls": 0, "enabled": False})
    assert mixer.mixup_enabled is False


@pytest.mark.parametrize("overrides,message", [
    (dict(mode="rows"), "mode must be one of"),
    (dict(switch_prob=1.5), "switch_prob"),
    (dict(mixup_alpha=0.0, cutmix_alpha=0.0), "--mixup and --cutmix are both 0"),
    (dict(alpha=2.0), "alpha and mixup_alpha"),
])
def test_bad_timm_args_are_refused_with_one_line(overrides, message):
    with pytest.raises(CatchupError, match=message):
        build_mixer("mixup", None, **mixup_args(**overrides))


def test_timm_cutmix_alone_leaves_feature_layers_their_own_alpha():
    """timm's --cutmix 1.0 without --mixup passes mixup_alpha=0 ("no Mixup"): the input layer mixes only with
    CutMix and the feature layers keep the method's own Beta alpha."""
    mixer = build_mixer("catchup", TinyNet(), **mixup_args(mixup_alpha=0.0))
    assert mixer.input_mixes == ("cutmix",) and mixer.alpha == 2.0
    with pytest.raises(CatchupError, match="alpha must be > 0"):
        build_mixer("catchup", TinyNet(), alpha=0.0)


# ---- collate_fn with timm.data.create_loader -------------------------------------------------------------


class PILDataset(torch.utils.data.Dataset):
    """PIL images and int labels, with the ``transform`` attribute timm's create_loader sets."""

    def __init__(self, n=16, size=20, skip=0):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
        self.labels = [i % NUM_CLASSES for i in range(n)]
        self.images, self.labels = self.images[skip:], self.labels[skip:]   # as a resumed epoch skips batches
        self.transform = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform is not None else image), self.labels[i]


def timm_loader(collate_fn, prefetcher, workers, training=True, skip=0):
    return create_loader(PILDataset(skip=skip), input_size=(3, 16, 16), batch_size=8, is_training=training,
                         use_prefetcher=prefetcher, num_workers=workers, collate_fn=collate_fn,
                         device=torch.device("cpu"), persistent_workers=False, no_aug=not training)


def capture_stage(model, name):
    """Records the output of stage ``name`` as the rest of the model sees it (after the mixing hook)."""
    seen = []
    getattr(model, name).register_forward_hook(lambda module, inputs, output: seen.append(output.detach().clone()))
    return seen


def count_applications(mixer):
    calls, inner = [], mixer.hooks.mix_fn
    mixer.hooks.mix_fn = lambda h, plan: (calls.append(plan.layer), inner(h, plan))[1]
    return calls


@pytest.mark.parametrize("prefetcher", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", ["manifold", "catchup"])
def test_collate_with_timm_create_loader_mixes_features_in_the_training_forward(name, prefetcher, workers):
    model = TinyNet()
    mixer = build_mixer(name, model, layers=["b"], **mixup_args(mixup_alpha=2.0))
    loader = timm_loader(mixer.collate, prefetcher, workers, training=False)   # known sample order
    mixed_features = capture_stage(model, "b")
    calls = count_applications(mixer)
    inputs_seen = []
    model.register_forward_pre_hook(lambda module, args: inputs_seen.append(type(args[0])))
    plans = []
    for input, target in loader:                        # timm's loop: nothing handed over but (input, target)
        plan = input.mix_plan
        plans.append(plan)
        assert isinstance(input, PlannedBatch) and plan.layer == 1 and input.dtype == torch.float32
        if workers and not prefetcher:
            assert input.is_shared()                    # came from the worker through shared memory
        calls.clear()
        model.train()
        output = model(input)
        mixed = mixed_features[-1]
        assert calls == [1] and mixer.hooks.plan is None and mixer.last_plan is plan
        assert inputs_seen[-1] is torch.Tensor          # the model's forward got a plain tensor
        SoftTargetCrossEntropy()(output, target).backward()
        # independent computation: the clean features of this input, mixed as the plan says
        with torch.no_grad():
            clean = model.b(model.a(input.as_subclass(torch.Tensor)))
        assert calls == [1]                             # a forward of submodules alone never consumes a plan
        if name == "manifold":
            expected = plan.lam * clean + (1 - plan.lam) * clean[plan.index]
        else:
            expected = reference_catchup(clean, plan.index, plan.lam)[0].float()
        assert torch.allclose(mixed, expected, atol=1e-5)
        labels = torch.tensor(PILDataset().labels[8 * len(plans) - 8:8 * len(plans)])  # unshuffled batches
        own = smoothed(labels)
        assert torch.allclose(target, own * plan.lam_eff + own[plan.index] * (1 - plan.lam_eff), atol=1e-6)
        calls.clear()
        model.eval()                                    # eval forwards strip the plan without arming anything
        with torch.no_grad():
            assert torch.equal(model(input), model(input.as_subclass(torch.Tensor)))
        assert calls == [] and mixer.hooks.plan is None
    assert len(plans) == 2


def test_collate_batches_through_a_compiled_model():
    """torch.compile traces the model's hooks: the plan must still be taken off eagerly and fire once."""
    model = TinyNet()
    mixer = build_mixer("manifold", model, layers=["b"], **mixup_args(mixup_alpha=2.0))
    compiled = torch.compile(model, backend="eager")    # dynamo's tracing without a code generator: fast on CPU
    mixed_features = capture_stage(model, "b")
    calls = count_applications(mixer)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        input, target = mixer.collate([(torch.randn(3, 8, 8, generator=g), i % NUM_CLASSES) for i in range(8)])
        plan = input.mix_plan
        calls.clear()
        compiled(input)
        assert calls == [1]
        with torch.no_grad():
            clean = model.b(model.a(input.as_subclass(torch.Tensor)))
        assert torch.allclose(mixed_features[-2], plan.lam * clean + (1 - plan.lam) * clean[plan.index], atol=1e-5)


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])   # all Mixup, all CutMix
def test_prefetcher_collate_mixes_uint8_images_and_obeys_the_loaders_off_switch(switch_prob):
    mixer = build_mixer("mixup", None, **mixup_args(switch_prob=switch_prob))
    loader = timm_loader(mixer.collate, prefetcher=True, workers=0, training=False)
    clean_loader = timm_loader(None, prefetcher=True, workers=0, training=False)     # timm's fast_collate
    for (x, target), (clean, labels) in zip(loader.loader, clean_loader.loader):
        plan = x.mix_plan
        assert x.dtype == clean.dtype == torch.uint8
        own = smoothed(labels)
        assert torch.allclose(target, own * plan.lam_eff + own[plan.index] * (1 - plan.lam_eff), atol=1e-6)
        if switch_prob == 0.0:
            expected = (plan.lam * clean.float() + (1 - plan.lam) * clean[plan.index].float()).round()
            assert (x.float() - expected).abs().max() <= 1      # rounding, as timm's FastCollateMixup
        else:
            assert bool(((x == clean) | (x == clean[plan.index])).all())
            assert (x != clean).any()
    # timm's train.py switches mixing off through PrefetchLoader.mixup_enabled, meant for FastCollateMixup
    assert isinstance(mixer.collate, FastCollateMixup) and loader.mixup_enabled
    loader.mixup_enabled = False
    assert mixer.mixup_enabled is False
    for (x, target), (clean, labels) in zip(loader, clean_loader):
        assert x.mix_plan is None and torch.equal(x, clean)      # normalised on the (here CPU) device
        assert torch.allclose(target, mixup_target(labels, NUM_CLASSES, 1.0, 0.1))


def collate_run(workers, state=None, epochs=(0, 0)):
    """Epochs through timm's loader (non-persistent workers, fixed order), each skipping the given number of
    samples; returns the plans the model's training forwards received and the mixer state after each batch."""
    model = TinyNet()
    mixer = build_mixer("catchup", model, seed=4, **mixup_args(prob=0.8))
    if state is not None:
        mixer.load_state_dict(state)
    plans, states = [], []
    for skip in epochs:
        for input, target in timm_loader(mixer.collate, prefetcher=False, workers=workers, training=False, skip=skip):
            model(input)
            plan = mixer.last_plan
            plans.append(None if plan is None else (plan.layer, plan.lam, plan.lam_eff, plan.index.tolist()))
            states.append(copy.deepcopy(mixer.state_dict()))
    return plans, states


def test_collate_plans_are_numbered_by_batch_so_workers_and_a_resume_replay_them():
    reference, states = collate_run(workers=0, epochs=(0, 0, 0))
    assert len(reference) == 6 and len(set(map(str, reference))) >= 5       # the plans really vary
    assert collate_run(workers=2, epochs=(0, 0, 0))[0] == reference          # same plans with worker processes
    for workers in (0, 2):     # resume after the first batch: the rest of its epoch skips it, then whole epochs
        resumed, _ = collate_run(workers, state=states[0], epochs=(8, 0, 0))
        assert resumed == reference[1:]


def test_collate_in_spawned_workers_gives_the_same_batches_and_plans():
    """spawn (macOS's default; forkserver, Linux's from Python 3.14, pickles the same way) sends each worker a
    pickled collate_fn: the model's hooks cannot travel and must not need to."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 16, 16, generator=g), i % NUM_CLASSES) for i in range(24)]
    runs = []
    for workers, context in ((0, None), (2, "spawn")):
        torch.manual_seed(0)
        model = TinyNet()
        mixer = build_mixer("catchup", model, seed=4, **mixup_args(prob=0.8))
        loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=workers, collate_fn=mixer.collate,
                                             multiprocessing_context=context)
        runs.append([(x.as_subclass(torch.Tensor), target, model(x), mixer.last_plan) for x, target in loader])
    for (x, target, out, plan), (x2, target2, out2, plan2) in zip(*runs, strict=True):
        assert torch.equal(x, x2) and torch.equal(target, target2) and torch.allclose(out, out2)
        assert (plan is None) == (plan2 is None)
        if plan is not None:
            assert (plan.layer, plan.lam, plan.index.tolist()) == (plan2.layer, plan2.lam, plan2.index.tolist())
    assert {p.layer for *_, p in runs[1] if p is not None} - {0}     # a feature layer mixed in the main process


@pytest.mark.parametrize("mode", ["elem", "pair"])
@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
def test_per_sample_and_per_pair_modes_of_the_input_methods(mode, switch_prob):
    x, y = batches(1, b=9)[0]                  # odd: in 'pair' mode one sample has no partner
    mixer = build_mixer("cutmix", None, **mixup_args(mode=mode, switch_prob=switch_prob, prob=0.8))
    kinds = []
    for _ in range(12):
        mixed, target, plan = mixer.prepare(x, y)
        index, own = plan.index, plan.own_weight
        if mode == "pair":
            assert torch.equal(index[index], torch.arange(9))         # partners are each other's
            assert int((index == torch.arange(9)).sum()) == 1
        for i in range(9):
            j = int(index[i])
            lam = float(plan.extras["lams"][i])
            if mode == "pair":
                assert float(plan.extras["lams"][j]) == lam and own[j] == own[i]
            if lam == 1.0 or i == j:
                assert torch.allclose(mixed[i], x[i], atol=1e-6)
            elif bool(plan.extras["use_cutmix"][i]):
                kinds.append("cutmix")
                from_partner = (mixed[i] != x[i]).any(0)
                assert torch.equal(mixed[i][:, from_partner], x[j][:, from_partner])
                assert float(own[i]) == pytest.approx(1 - float(from_partner.float().mean()), abs=1 / 16)
            else:
                kinds.append("mixup")
                assert float(own[i]) == pytest.approx(lam)
                assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
        expected = smoothed(y) * own[:, None] + smoothed(y)[index] * (1 - own[:, None])
        assert torch.allclose(target, expected, atol=1e-6)
    assert set(kinds) == {"mixup", "cutmix"} if switch_prob == 0.5 else \
        set(kinds) == {"mixup" if switch_prob == 0.0 else "cutmix"}


def test_methods_mixing_whole_batches_refuse_per_sample_modes():
    with pytest.raises(CatchupError, match="catchup offers mode 'batch', not 'elem'"):
        build_mixer("catchup", TinyNet(), **mixup_args(mode="elem"))
    with pytest.raises(CatchupError, match="offers mode 'batch' or 'elem' or 'pair', not 'half'"):
        build_mixer("mixup", None, **mixup_args(mode="half"))


def test_only_order_keeping_operations_carry_the_plan_and_a_lost_plan_is_refused():
    model = TinyNet()
    mixer = build_mixer("catchup", model, layers=["b"], num_classes=NUM_CLASSES, seed=0)
    x, _ = mixer.collate([(torch.rand(3, 8, 8), i % NUM_CLASSES) for i in range(6)])
    plan = x.mix_plan
    assert plan is not None and plan.layer == 1
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    kept = [x.to(torch.float64), x.clone().sub_(0.1).div_(0.2), (x - mean) / 0.2, x.clone(), x.detach(),
            x.contiguous(memory_format=torch.channels_last), x.half()]
    assert all(isinstance(y, PlannedBatch) and y.mix_plan is plan for y in kept)
    # reordering, re-batching and reducing results never carry partner indices that now point elsewhere
    dropped = [x.flip(0), x[torch.tensor([1, 0, 2, 3, 4, 5])], x.roll(1, 0), torch.cat([x[3:], x[:3]]),
               x.sum(dim=(1, 2, 3)), x.mean(1), x[:3]]
    assert not any(isinstance(y, PlannedBatch) for y in dropped)
    model.train()
    with pytest.raises(CatchupError, match="carries no mix plan.* dropped it"):
        model(x.flip(0))
    model(x)                                       # the plan as the collate_fn made it: fine
    model.eval()(x.flip(0))                        # evaluation needs no plan
    model.train()
    xm, _ = mixer(torch.rand(6, 3, 8, 8), torch.arange(6) % NUM_CLASSES)
    model(xm)                                      # the mixup_fn form arms the forward itself
    with pytest.raises(CatchupError, match="carries no mix plan"):
        model(xm)                                  # ... once
