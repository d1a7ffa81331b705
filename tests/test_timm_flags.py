"""timm's own train.py with its usual mixup flags: every combination timm's Mixup accepts works with every method,
or is refused naming timm's flag; models at a size other than their config; gradient checkpointing; timm's seeds
and ranks; resuming in timm's loop.

The stand-in parses timm's flags with timm's names and defaults and builds ``mixup_args`` exactly as timm's
train.py does, then replaces ``Mixup(**mixup_args)`` / ``FastCollateMixup(**mixup_args)`` by ``build_mixer``.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

from catchup import CatchupError, build_mixer
from catchup.mix import MIXERS, MixPlan
from tests.helpers import TinyNet

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def timm_mixup_args(argv: list[str], num_classes: int = 5) -> dict | None:
    """timm train.py's mixup flags (names and defaults as timm's parser) and its ``mixup_args`` construction."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--cutmix", type=float, default=0.0)
    parser.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    parser.add_argument("--mixup-prob", type=float, default=1.0)
    parser.add_argument("--mixup-switch-prob", type=float, default=0.5)
    parser.add_argument("--mixup-mode", type=str, default="batch")
    parser.add_argument("--smoothing", type=float, default=0.1)
    args = parser.parse_args(argv)
    if not (args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None):
        return None     # timm builds no mixer at all
    return dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=num_classes)


FLAG_SETS = [
    ["--cutmix", "1.0"],                                    # CutMix only: mixup_alpha=0
    ["--mixup", "0.8"],                                     # Mixup only: cutmix_alpha=0
    ["--mixup", "0.8", "--cutmix", "1.0"],                  # timm's ImageNet recipes
    ["--mixup", "0.8", "--cutmix", "1.0", "--mixup-switch-prob", "1.0"],
    ["--cutmix-minmax", "0.2", "0.8"],
    ["--mixup", "0.2", "--cutmix", "1.0", "--mixup-prob", "0.5", "--smoothing", "0.0"],
    ["--mixup", "0.8", "--mixup-mode", "elem"],
    ["--cutmix", "1.0", "--mixup-mode", "pair"],
]
TIMM_FLAGS = ("--mixup", "--cutmix", "--cutmix-minmax", "--mixup-prob", "--mixup-switch-prob", "--mixup-mode",
              "--smoothing")


class TimmTinyNet(TinyNet):
    """TinyNet with timm's classifier interface (SnapMix reads class activation maps through it)."""

    def forward_features(self, x):
        return self.c(self.b(self.a(x)))

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def one_step(name: str, args: dict) -> None:
    torch.manual_seed(0)
    model = TimmTinyNet().train()
    mixer = build_mixer(name, model, **args)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
        xm, target = mixer(x, y)
        loss = SoftTargetCrossEntropy()(model(xm), target)
        loss.backward()
        assert torch.isfinite(loss) and target.min() >= 0
        if name != "snapmix":       # SnapMix weighs each image by its CAM share: the two need not sum to 1
            assert torch.allclose(target.sum(1), torch.ones(8))


@pytest.mark.parametrize("flags", FLAG_SETS, ids=" ".join)
def test_every_timm_flag_combination_trains_or_is_refused_naming_the_flag(flags):
    args = timm_mixup_args(flags)
    outcomes = {}
    for name in MIXERS:
        if name in ("puzzlemix", "comixup"):
            pytest.importorskip("gco")
        try:
            one_step(name, args)
            outcomes[name] = "trains"
        except CatchupError as err:
            assert any(flag in str(err) for flag in TIMM_FLAGS), f"{name}: {err}"
            assert "\n" not in str(err)
            outcomes[name] = "refused"
    per_sample = "--mixup-mode" in flags
    for name, outcome in outcomes.items():
        # Only Mixup and CutMix mix per sample (timm's 'elem'/'pair'); every batch-mode combination trains.
        expected = "trains" if not per_sample or name in ("mixup", "cutmix", "none") else "refused"
        assert outcome == expected, (name, outcome)


def test_feature_layers_use_the_methods_alpha_when_timm_passes_mixup_0():
    for name, alpha in (("catchup", 2.0), ("manifold", 2.0)):
        mixer = build_mixer(name, TinyNet(), **timm_mixup_args(["--cutmix", "1.0"]))
        assert mixer.alpha == alpha and mixer.input_mixes == ("cutmix",)
        plans = [mixer.prepare(torch.rand(4, 3, 8, 8), torch.arange(4))[2] for _ in range(40)]
        assert {p.extras.get("input_mix") for p in plans if p.layer == 0} == {"cutmix"}
        assert any(p.layer > 0 for p in plans)
    # the method's own mixing gets timm's alpha where it is given
    assert build_mixer("catchup", TinyNet(), **timm_mixup_args(["--mixup", "0.4", "--cutmix", "1"])).alpha == 0.4


def test_both_alphas_zero_is_refused_only_when_the_input_is_mixed():
    args = dict(timm_mixup_args(["--cutmix-minmax", "0.2", "0.8"]), cutmix_minmax=None, cutmix_alpha=0.0)
    with pytest.raises(CatchupError, match="--mixup and --cutmix are both 0"):
        build_mixer("catchup", TinyNet(), **args)
    assert build_mixer("catchup", TinyNet(), layers=["a", "b"], **args).input_mixes == ()


# ---- models at another size than their config -------------------------------------------------------


def test_a_model_built_for_another_size_needs_no_input_size():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, depth=2).train()
    mixer = build_mixer("catchup", model, **timm_mixup_args(["--mixup", "0.8", "--cutmix", "1.0"]))
    assert all(s.layout is None for s in mixer.stages[1:])      # nothing probed at the config's 224 px
    seen = []
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    mixer.layer_weights = np.eye(len(mixer.stages))[2]          # force the last block
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    xm, target = mixer(x, y)
    SoftTargetCrossEntropy()(model(xm), target).backward()
    assert mixer.stages[2].layout == "NLC" and mixer.last_plan.layer == 2 and seen[-1][0] == 4


# ---- gradient checkpointing ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}), ("convnext_atto", {}),
                                         ("vit_tiny_patch16_224", dict(img_size=32, depth=4))])
def test_gradient_checkpointing_mixes_as_without_it(name, kwargs):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5, **kwargs).train()
    checkpointed = timm.create_model(name, num_classes=5, **kwargs).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    mixers = [build_mixer("catchup", m, num_classes=5, seed=0) for m in (plain, checkpointed)]
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for m in mixers:
        m.learn_stages(x.shape[1:])
    index = torch.tensor([2, 3, 1, 0])
    for layer in range(1, len(mixers[0].stages)):
        results = []
        for model, mixer in zip((plain, checkpointed), mixers):
            applied = []
            inner = mixer.hooks.mix_fn
            mixer.hooks.mix_fn = lambda h, plan, inner=inner: (applied.append(plan.layer), inner(h, plan))[1]
            channels = mixer.stages[layer].channels
            mixer.arm(MixPlan(layer, 0.5, index, 0.5, {"n_keep": torch.tensor(channels // 3)}))
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
            mixer.hooks.mix_fn = inner
            results.append((out.detach(), [p.grad.clone() for p in model.parameters()], applied))
        (out_a, grads_a, applied_a), (out_b, grads_b, applied_b) = results
        assert applied_a == [layer] and applied_b[0] == layer and set(applied_b) == {layer}
        assert torch.allclose(out_a, out_b, atol=1e-5), (name, layer)
        for ga, gb in zip(grads_a, grads_b):
            assert torch.allclose(ga, gb, atol=1e-4, rtol=1e-3), (name, layer)


class Bypassing(TinyNet):
    """Calls stage b's layers one by one, never b or its last module: in training only, or always."""
    grad_checkpointing = True

    def __init__(self, always: bool):
        super().__init__()
        self.always = always
        self.b = torch.nn.Sequential(self.b[0], self.b[1], torch.nn.Identity())

    def forward(self, x):
        h = self.a(x)
        h = self.b[1](self.b[0](h)) if self.training or self.always else self.b(h)
        return self.fc(self.c(h).mean((2, 3)))


def test_a_stage_that_checkpointing_bypasses_is_refused_naming_it():
    model = Bypassing(always=True)
    mixer = build_mixer("manifold", model, layers=["b"], num_classes=5)
    with pytest.raises(CatchupError, match="module 'b' .* gradient checkpointing"):
        mixer(torch.rand(4, 3, 8, 8), torch.arange(4))          # the first batch probes the stages
    model = Bypassing(always=False).train()                     # the probe (in eval) sees b; training does not
    mixer = build_mixer("manifold", model, layers=["b"], num_classes=5)
    mixer(torch.rand(4, 3, 8, 8), torch.arange(4))
    with pytest.raises(CatchupError, match="module 'b' was not called by the training forward: gradient "
                                           "checkpointing"):
        model(torch.rand(4, 3, 8, 8))
    model.grad_checkpointing = False
    mixer(torch.rand(4, 3, 8, 8), torch.arange(4))
    with pytest.raises(CatchupError, match="module 'b' was not called by the training forward, so its hook"):
        model(torch.rand(4, 3, 8, 8))


# ---- seeds, ranks and resume in timm's loop -----------------------------------------------------------


def plans_of(mixer, steps=6):
    return [mixer.prepare(torch.rand(6, 3, 8, 8), torch.arange(6) % 5)[2] for _ in range(steps)]


def same_plans(a, b):
    return all((p is None and q is None) or (p is not None and q is not None and p.layer == q.layer
               and p.lam == q.lam and torch.equal(p.index, q.index)) for p, q in zip(a, b))


def test_the_default_seed_follows_timms_seed_and_rank():
    def timm_mixer(seed, rank):
        torch.manual_seed(seed + rank)          # timm's utils.random_seed(args.seed, rank)
        return build_mixer("catchup", TinyNet(), **timm_mixup_args(["--mixup", "0.8", "--cutmix", "1.0"]))
    assert same_plans(plans_of(timm_mixer(42, 0)), plans_of(timm_mixer(42, 0)))
    assert not same_plans(plans_of(timm_mixer(42, 0)), plans_of(timm_mixer(42, 1)))     # ranks differ
    assert not same_plans(plans_of(timm_mixer(42, 0)), plans_of(timm_mixer(7, 0)))      # --seed changes them
    torch.manual_seed(1)
    explicit = build_mixer("catchup", TinyNet(), seed=3, **timm_mixup_args(["--cutmix", "1.0"]))
    torch.manual_seed(2)
    assert same_plans(plans_of(explicit), plans_of(build_mixer("catchup", TinyNet(), seed=3,
                                                               **timm_mixup_args(["--cutmix", "1.0"]))))


def test_resume_in_timms_loop_continues_the_plans_with_seek():
    """timm's checkpoint holds the epoch; after ``--resume`` one line continues the plans."""
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(6, 3, 8, 8, generator=g), torch.arange(6) % 5) for _ in range(4)]
    torch.manual_seed(42)
    mixer = build_mixer("catchup", TinyNet(), **timm_mixup_args(["--mixup", "0.8", "--cutmix", "1.0"]))
    whole = [mixer.prepare(x, y)[2] for epoch in range(2) for x, y in loader]
    torch.manual_seed(42)                     # the resumed process: same --seed and rank
    resumed = build_mixer("catchup", TinyNet(), **timm_mixup_args(["--mixup", "0.8", "--cutmix", "1.0"]))
    start_epoch = 1
    resumed.seek(start_epoch * len(loader))   # the line a timm user adds after resume_checkpoint
    assert same_plans([resumed.prepare(x, y)[2] for x, y in loader], whole[4:])
    assert not same_plans(plans_of(build_mixer("catchup", TinyNet(), seed=mixer.seed), 4), whole[4:])


TWO_RANKS = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
from catchup import build_mixer
from tests.helpers import TinyNet
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(42 + rank)     # timm: utils.random_seed(args.seed, rank)
model = torch.nn.parallel.DistributedDataParallel(TinyNet())
mixer = build_mixer("catchup", model, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, num_classes=5)
plans = []
for step in range(4):
    x, target = mixer(torch.rand(6, 3, 8, 8), torch.arange(6) % 5)
    model(x).sum().backward()
    plans.append([mixer.last_plan.layer, mixer.last_plan.lam, mixer.last_plan.index.tolist()])
# one file per rank: the ranks' stdout is unbuffered, so printed lines interleave
with open(os.path.join(sys.argv[1], f"plans{rank}.json"), "w") as f:
    json.dump(plans, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_timm_processes_draw_different_plans(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = [json.loads((tmp_path / f"plans{rank}.json").read_text()) for rank in (0, 1)]
    assert len(plans[0]) == len(plans[1]) == 4 and plans[0] != plans[1]


def test_the_collate_form_in_timms_loop_sizes_checkpoints_and_resumes():
    """FastCollateMixup's place: a model built for 32 px, gradient checkpointing on, worker processes, timm's
    --cutmix alone; the plans of epoch 1 again after a resume with ``seek``."""
    def timm_run(epochs, start_epoch=0):
        torch.manual_seed(42)                                  # timm's --seed 42, rank 0
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).train()
        model.set_grad_checkpointing(True)
        collate_fn = build_mixer("catchup", model, **timm_mixup_args(["--cutmix", "1.0"])).collate
        collate_fn.mixer.seek(start_epoch * 3)                 # after timm's resume_checkpoint
        g = torch.Generator().manual_seed(0)
        data = [(torch.rand(3, 32, 32, generator=g), i % 5) for i in range(12)]
        applied = []
        inner = collate_fn.mixer.hooks.mix_fn
        collate_fn.mixer.hooks.mix_fn = lambda h, plan: (applied.append(plan.layer), inner(h, plan))[1]
        plans = []
        for epoch in range(start_epoch, epochs):
            loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_fn, num_workers=2)
            for input, target in loader:
                plan = input.mix_plan
                del applied[:]
                SoftTargetCrossEntropy()(model(input), target).backward()
                # a feature plan mixes once in the forward and again in each checkpointed recomputation
                assert set(applied) == ({plan.layer} if plan is not None and plan.layer > 0 else set())
                plans.append(plan)
        return plans
    whole = timm_run(epochs=2)
    assert any(p.layer > 0 for p in whole) and any(p.layer == 0 for p in whole)
    assert same_plans(timm_run(epochs=2, start_epoch=1), whole[3:])
