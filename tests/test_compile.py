"""torch.compile: mixing at any layer runs the same compiled code (one graph through torch.cond, or regions
around the hooks), weights carry no wrapper prefix, and compiled and eager runs resume from each other's
checkpoints.

Graphs are counted as calls of the compiler backend (dynamo hands it one graph per compilation): a counting
backend in the unit tests, ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` for a whole train.py run.
"""
import copy
import csv

import numpy as np
import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import catchup.models  # noqa: F401
from catchup.analysis.filters import FilterNormTracker
from catchup.compile import PaddedEval, compile_model, compile_regions, is_compiled, pad_batch, uncompile
from catchup.mix import build_mixer
from catchup.runs import load_run
from tests.helpers import load_safetensors, run_train, train_step
from tests.helpers import load_benchmark as load

pytestmark = pytest.mark.usefixtures("one_thread")
REGIONS = ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "final", "global_pool", "fc"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()     # compiled code of earlier tests' models would otherwise be reused or counted
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("preactresnet18", width=4, num_classes=10, in_chans=1)


def force_layer(mixer, layer):
    """The next plan mixes at ``layer`` (None: no mixing)."""
    mixer.enabled = layer is not None
    if layer is not None:
        mixer.layer_weights = np.eye(len(mixer.stages))[layer]


def test_regions_split_only_around_hooked_modules():
    model = tiny_model()
    assert compile_regions(model, "eager") == ["(model)"]     # nothing hooked: the whole model is one region
    model = tiny_model()
    mixer = build_mixer("catchup", model, num_classes=10, input_size=(1, 8, 8))
    assert [s.module_name for s in mixer.stages[1:]] == REGIONS[:5]
    assert compile_regions(model, "eager") == REGIONS
    assert is_compiled(model) and "_orig_mod" not in "".join(model.state_dict())
    assert not is_compiled(uncompile(model))


def test_mixing_at_every_layer_and_eval_of_a_partial_batch_never_recompile():
    model = tiny_model()
    eager = copy.deepcopy(model)
    mixer = build_mixer("catchup", model, num_classes=10, input_size=(1, 8, 8), seed=3)
    eager_mixer = build_mixer("catchup", eager, num_classes=10, input_size=(1, 8, 8), seed=3)
    backend = CompileCounterWithBackend("aot_eager")
    compile_regions(model, backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)

    for m, net in ((mixer, model), (eager_mixer, eager)):   # both mixers draw from the same stream
        force_layer(m, None)
        train_step(m, net, x, y)
    assert backend.frame_count == len(REGIONS)            # the first training step: one graph per region
    for layer in [0, 1, 2, 3, 4, 5, None, 3, 5, 1]:      # every layer, no mixing, new lambdas and partners
        for m in (mixer, eager_mixer):
            force_layer(m, layer)
        _, _, loss, _ = train_step(mixer, model, x, y)
        _, _, eager_loss, _ = train_step(eager_mixer, eager, x, y)
        assert mixer.last_plan is None if layer is None else mixer.last_plan.layer == layer
        # the hook really mixed between the compiled regions: the same plan gives the eager model's loss
        assert torch.allclose(loss, eager_loss, atol=1e-5), layer
    assert backend.frame_count == len(REGIONS)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, dict(eager.named_parameters())[name].grad, atol=1e-4), name

    model.eval()
    evaluated = PaddedEval(model)
    with torch.no_grad():
        full = evaluated(x)
        assert backend.frame_count == 2 * len(REGIONS)    # evaluation (eval mode, no grad): one more per region
        partial = evaluated(x[:5])
        assert torch.allclose(partial, full[:5], atol=1e-6)
        ema = copy.deepcopy(model)                        # an EMA copy runs its own weights on the same code
        assert ema.stem.forward.__self__ is ema.stem
        with torch.no_grad():
            for p in ema.parameters():
                p.mul_(0.5)
        assert not torch.allclose(PaddedEval(ema)(x), full)
    assert backend.frame_count == 2 * len(REGIONS)


@pytest.mark.parametrize("method, layers", [("catchup", [None, 0, 1, 2, 3, 4, 5, None, 4, 2, 1]),
                                            ("manifold", [None, 0, 1, 2, 1]), ("moex", [None, 0, 0])])
def test_one_graph_mixes_every_layer_as_eager_does(method, layers):
    model = tiny_model()
    eager = copy.deepcopy(model)
    mixer = build_mixer(method, model, num_classes=10, input_size=(1, 8, 8), seed=3, prob=1.0)
    eager_mixer = build_mixer(method, eager, num_classes=10, input_size=(1, 8, 8), seed=3, prob=1.0)
    backend = CompileCounterWithBackend("aot_eager")
    assert compile_model(model, backend, mixer).startswith("one compiled graph")
    assert is_compiled(model) and "_orig_mod" not in "".join(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    losses = set()
    for layer in layers:          # every layer, no mixing, new lambdas and partners
        for m in (mixer, eager_mixer):
            force_layer(m, layer)
        _, _, loss, _ = train_step(mixer, model, x, y)
        _, _, eager_loss, _ = train_step(eager_mixer, eager, x, y)
        assert torch.allclose(loss, eager_loss, atol=1e-5), layer    # the same plan mixes the same way
        losses.add(round(loss.item(), 5))
        for name, p in model.named_parameters():
            assert torch.allclose(p.grad, dict(eager.named_parameters())[name].grad, atol=1e-4), (layer, name)
    assert len(losses) > 2 and backend.frame_count == 1       # the layers mixed differently, all in one graph
    model.eval()
    with torch.no_grad():
        evaluated = PaddedEval(model)
        full = evaluated(x)
        assert torch.allclose(evaluated(x[:5]), full[:5], atol=1e-6)
        assert torch.allclose(full, eager.eval()(x), atol=1e-5)
        ema = copy.deepcopy(model)                            # an EMA copy runs its own weights on the same code
        for p in ema.parameters():
            p.mul_(0.5)
        assert not torch.allclose(PaddedEval(ema)(x), full)
    assert backend.frame_count == 2                           # training and evaluation


def test_one_graph_takes_its_plans_from_the_collate_fn():
    model = tiny_model()
    eager = copy.deepcopy(model)
    mixers = [build_mixer("catchup", m, num_classes=10, input_size=(1, 8, 8), seed=5) for m in (model, eager)]
    backend = CompileCounterWithBackend("aot_eager")
    compile_model(model, backend, mixers[0])
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(1, 8, 8, generator=g), i % 10) for i in range(48)]
    layers = set()
    for epoch in range(3):
        loaders = [torch.utils.data.DataLoader(data, batch_size=16, collate_fn=m.collate) for m in mixers]
        for (x, target), (eager_x, eager_target) in zip(*loaders):
            layers.add(mixers[0].last_plan.layer)
            assert torch.equal(target, eager_target)
            assert torch.allclose(model(x), eager(eager_x), atol=1e-5)    # the plan rode in on the batch
    assert len(layers - {0}) >= 3 and backend.frame_count == 1


@pytest.mark.parametrize("case", ["alignmix", "tracker"])
def test_plans_with_python_values_or_other_hooks_compile_as_regions(case):
    model = tiny_model()
    mixer = build_mixer("alignmix" if case == "alignmix" else "catchup", model, num_classes=10,
                        input_size=(1, 8, 8))
    if case == "tracker":     # switches its hooks on and off, which a compiled graph would not notice
        FilterNormTracker(model, every=2)
    assert compile_model(model, "eager", mixer).endswith("compiled regions around the hooked modules")
    assert mixer.hooks.slots is None


def test_pad_batch_repeats_the_last_sample_and_keeps_the_memory_format():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 3, 2, 2) and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:2], x) and torch.equal(padded[2], x[1]) and torch.equal(padded[3], x[1])
    assert pad_batch(x, 2) is x


def test_three_epoch_quickstart_compiles_at_most_three_graphs_and_writes_plain_weights(tmp_path):
    out = tmp_path / "compiled"
    run_train(out, "--epochs", "3", "--seed", "1", "--torchcompile", "aot_eager", "--model-ema", "--model-ema-decay", "0.9")
    rows = list(csv.DictReader((out / "summary.csv").open()))
    hit = {k.rsplit("/", 1)[1] for row in rows for k, v in row.items() if k.startswith("mix_layer_share/") and v
           and float(v) > 0}
    assert {"0", "1", "2", "3", "4", "5"} <= hit                  # every layer was mixed at
    # one graph for training, one for evaluation (the EMA evaluation reuses it)
    assert counters["stats"]["unique_graphs"] <= 3
    for name in ("model.safetensors", "model_ema.safetensors"):
        keys = load_safetensors(out / name)
        assert not any("_orig_mod" in k for k in keys)
        plain = timm.create_model("preactresnet18", width=4, num_classes=10, in_chans=1)
        plain.load_state_dict(keys)                               # strict: every key matches a plain timm model
    assert load_run(out).model is not None


def test_compiled_and_eager_runs_resume_from_each_other(tmp_path):
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    run_train(straight, "--epochs", "3")
    run_train(mixed, "--epochs", "3", "--max-steps", "16")                     # eager, stops inside epoch 1
    run_train(mixed, "--epochs", "3", "--max-steps", "27", "--resume", "--torchcompile", "aot_eager")
    run_train(mixed, "--epochs", "3", "--resume")                               # eager again, to the end
    a, b = load_safetensors(straight / "model.safetensors"), load_safetensors(mixed / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_benchmarks_whole_model_design_mixes_and_compiles_once_per_layer():
    """benchmarks/compile.py --whole-model: the hooks traced into one compiled forward. Dynamo does not guard on
    module hooks, so a hook-less model of the same class compiled first must not lend it its graph."""
    compile_bench = load("compile")
    backend = CompileCounterWithBackend("eager")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    plain = tiny_model()
    compile_bench.compile_traced_hooks(plain, backend, hooks_as_breaks=False)
    plain(x)
    assert backend.frame_count == 1
    model = tiny_model()
    eager = copy.deepcopy(model)
    mixer = build_mixer("catchup", model, num_classes=10, input_size=(1, 8, 8), seed=3)
    eager_mixer = build_mixer("catchup", eager, num_classes=10, input_size=(1, 8, 8), seed=3)
    compile_bench.compile_traced_hooks(model, backend, hooks_as_breaks=False)
    for rounds in range(2):
        for layer in [None, 0, 1, 2, 3, 4, 5]:
            for m in (mixer, eager_mixer):
                force_layer(m, layer)
            _, _, loss, _ = train_step(mixer, model, x, y)
            _, _, eager_loss, _ = train_step(eager_mixer, eager, x, y)
            assert torch.allclose(loss, eager_loss, atol=1e-5), layer    # the traced hook really mixed
        # one graph for no mixing (input mixing happens outside the model) and one per feature layer, all
        # compiled in the first round
        assert backend.frame_count == 1 + 1 + 5
    assert "_orig_mod" not in "".join(model.state_dict())
