"""Catch-up Mix under bf16 autocast (what `accelerate launch --mixed_precision bf16` runs): filter influence is
ranked in float32, and the mixed map keeps the autocast dtype and layout the next layer expects."""
import numpy as np
import pytest
import timm
import torch

import catchup.models  # noqa: F401
from catchup.mix import build_mixer
from catchup.mix.catchup import catchup_keep_mask, filter_influence
from tests.helpers import reference_keep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layer", [2, 3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_ranks_in_float32_and_mixed_maps_stay_bf16(layer, channels_last):
    torch.manual_seed(0)
    model = timm.create_model("preactresnet18", width=8, num_classes=10, in_chans=1).train()
    mixer = build_mixer("catchup", model, num_classes=10, input_size=(1, 8, 8), seed=1)
    mixer.layer_weights = np.eye(len(mixer.stages))[layer]
    stage = dict(model.named_modules())[mixer.stages[layer].module_name]
    seen = {}

    def after_mixing(module, inputs, output):    # registered after the mixer's hook: sees what it returned
        seen["mixed"] = output

    def before_mixing(module, inputs):
        seen["input"] = inputs[0]
    stage.register_forward_hook(after_mixing)
    next_module = {1: "stages.0", 2: "stages.1", 3: "stages.2", 4: "stages.3", 5: "final"}[layer]
    dict(model.named_modules())[next_module].register_forward_pre_hook(before_mixing)
    x = torch.randn(8, 1, 8, 8)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        xm, _ = mixer(x, y)
        plan = mixer.last_plan
        clean = {}

        def before_the_mixer(module, inputs, output):   # returns None: the output goes on unchanged
            clean["h"] = output.detach().clone()
        h_hook = stage.register_forward_hook(before_the_mixer, prepend=True)
        out = model(xm)
        h_hook.remove()
        h = clean["h"]
        assert h.dtype == torch.bfloat16                      # the stage really ran in bf16
        assert filter_influence(h).dtype == torch.float32     # ranked in float32 under autocast
        keep = catchup_keep_mask(h, plan.index, plan.extras["n_keep"])
    assert plan.layer == layer
    # the kept channels are the ones a float64 loop over the same bf16 values picks
    lam = int(plan.extras["n_keep"]) / h.shape[1]
    expected = reference_keep(h, plan.index, lam + 1e-9)
    assert [set(torch.nonzero(row).flatten().tolist()) for row in keep] == expected
    mixed = seen["mixed"]
    assert mixed.dtype == torch.bfloat16 and seen["input"].dtype == torch.bfloat16
    assert not torch.equal(mixed, h)                          # it did mix
    if channels_last:
        assert mixed.is_contiguous(memory_format=torch.channels_last) == h.is_contiguous(
            memory_format=torch.channels_last)
    out.float().sum().backward()                              # and backward runs through it to the stem
    first = next(model.parameters())
    assert first.grad is not None and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                          if p.grad is not None)
