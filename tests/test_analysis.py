"""Analysis tools checked against independent computations: eigh, closed-form Hessians, direct autograd."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

import catchup.models  # noqa: F401  (registers preactresnet18 with timm)
from catchup.analysis.__main__ import main as analysis_main
from catchup.analysis.filters import FilterNormTracker, load_filter_norms
from catchup.analysis.hessian import top_eigen
from catchup.analysis.landscape import filter_normalized_direction, landscape
from catchup.errors import CatchupError
from catchup.mix.catchup import catchup_mix
from catchup.mix.plan import MixPlan, StageHooks
from catchup.stages import feature_stages, resolve_stages
from tests.helpers import run_train


pytestmark = pytest.mark.usefixtures("one_thread")


# --- Hessian ------------------------------------------------------------------------------------------------

class Quadratic(nn.Module):
    """loss = 0.5 x^T A x: its Hessian is A everywhere."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.x = nn.Parameter(torch.randn(a.shape[0], dtype=a.dtype, generator=torch.Generator().manual_seed(1)))

    def forward(self, _inputs):
        return 0.5 * self.x @ self.a @ self.x


def _known_symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _top_by_magnitude(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    order = values.abs().argsort(descending=True)[:k]
    return values[order], vectors[:, order]


def test_power_iteration_finds_the_eigenpairs_of_a_quadratic():
    a = _known_symmetric([6.0, -4.0, 1.5, 1.0, 0.5, -0.2, 0.1])    # largest magnitudes: 6, then -4
    model = Quadratic(a)
    values, vectors = top_eigen(model, lambda out, _t: out, (torch.zeros(1), torch.zeros(1)), k=2,
                                iters=500, tol=1e-12)
    ref_values, ref_vectors = _top_by_magnitude(a, 2)
    np.testing.assert_allclose(values, ref_values.numpy(), rtol=1e-6)
    for v, ref in zip(vectors, ref_vectors.T):
        assert abs(float(v[0] @ ref)) == pytest.approx(1.0, abs=1e-6)     # same line, either sign
    assert abs(float(vectors[0][0] @ vectors[1][0])) < 1e-6


def test_power_iteration_on_least_squares_matches_x_t_x_over_n_across_uneven_batches():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, dtype=torch.float64, generator=gen) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3],
                                                                            dtype=torch.float64)
    y = torch.randn(64, dtype=torch.float64, generator=gen)
    model = nn.Linear(5, 1, bias=False).double()
    loss_fn = lambda out, t: 0.5 * ((out.squeeze(1) - t) ** 2).mean()  # noqa: E731
    values, vectors = top_eigen(model, loss_fn, [(x[:40], y[:40]), (x[40:], y[40:])], k=2, iters=1000, tol=1e-12)
    ref_values, ref_vectors = _top_by_magnitude(x.T @ x / 64, 2)
    np.testing.assert_allclose(values, ref_values.numpy(), rtol=1e-6)
    for v, ref in zip(vectors, ref_vectors.T):
        assert abs(float(v[0].flatten() @ ref)) == pytest.approx(1.0, abs=1e-5)


def test_top_eigen_restores_train_mode_and_rejects_bad_k():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).train()
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    top_eigen(model, nn.CrossEntropyLoss(), batch, k=1, iters=3)
    assert all(m.training for m in model.modules())
    with pytest.raises(CatchupError, match="k must be"):
        top_eigen(model, nn.CrossEntropyLoss(), batch, k=0)


# --- landscape ----------------------------------------------------------------------------------------------

def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_filter_normalized_direction_matches_each_filters_norm():
    model = _small_cnn()
    direction = filter_normalized_direction(model, seed=5)
    for p, d in zip(model.parameters(), direction):
        assert d.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0                   # biases and BatchNorm: no direction
            continue
        for i in range(p.shape[0]):                              # slow loop, filter by filter
            assert float(d[i].norm()) == pytest.approx(float(p[i].detach().norm()), rel=1e-5)
        assert not torch.allclose(d, p)                          # a random direction, not the weights


@pytest.mark.parametrize("directions", ["hessian", "random"])
def test_landscape_center_is_the_plain_loss_and_weights_come_back_bit_exact(directions):
    model = _small_cnn().train()
    for _ in range(2):                                           # give BatchNorm non-trivial running stats
        model(torch.randn(16, 1, 6, 6))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 1, 6, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)),
               (torch.randn(6, 1, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        model.eval()
        plain = sum(float(loss_fn(model(x), y)) * len(y) for x, y in batches) / 16
        model.train()
    result = landscape(model, loss_fn, batches, steps=3, span=0.5, directions=directions, iters=5, progress=False)
    assert result["alphas"].tolist() == [-0.5, 0.0, 0.5]
    assert result["loss_1d"][1] == pytest.approx(plain, rel=1e-6)
    assert result["loss_2d"][1, 1] == pytest.approx(plain, rel=1e-6)
    assert result["loss_2d"][0, 1] == pytest.approx(result["loss_1d"][0], rel=1e-6)   # b = 0 row is the 1-D curve
    assert result["loss_2d"].max() > plain                       # moving away changes the loss
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())


# --- filter-norm tracker ------------------------------------------------------------------------------------

def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("preactresnet18", width=4, num_classes=10, in_chans=1).train()


def _batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _direct_norms(model: nn.Module, stage: str, x, y, replace=None):
    """Activation and gradient norms by hand: a hook keeps the stage output (optionally replacing it first)."""
    kept = []

    def hook(module, inputs, output):
        out = replace(output) if replace is not None else output
        kept.append(out)
        return out

    handle = dict(model.named_modules())[stage].register_forward_hook(hook)
    loss = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, kept[0])
    handle.remove()
    act = torch.stack([kept[0][:, c].detach().flatten(1).norm(dim=1) for c in range(kept[0].shape[1])], 1)
    return act.mean(0).numpy(), grad.flatten(2).norm(dim=2).mean(0).numpy()


def _tracked_step(model, tracker, x, y, step=0):
    assert tracker.begin_step(step)
    nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return tracker.end_step()


def test_tracker_norms_equal_direct_autograd_norms_at_every_stage():
    model, (x, y) = _tiny_resnet(), _batch()
    tracker = FilterNormTracker(model, every=5)
    assert tracker.stages == ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]
    record = _tracked_step(model, tracker, x, y, step=10)
    assert record["step"] == 10
    for stage in tracker.stages:
        act, grad = _direct_norms(model, stage, x, y)
        np.testing.assert_allclose(record["stages"][stage]["act_norm"], act, rtol=1e-5)
        np.testing.assert_allclose(record["stages"][stage]["grad_norm"], grad, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("family, channel_axis", [("swin", 3), ("mambaout", 3), ("vit", 2)])
def test_tracker_finds_the_channels_of_nhwc_and_token_maps(family, channel_axis):
    from tests.model_families import FAMILIES, create
    name, kwargs, size, _ = FAMILIES[family]
    model = create(name, kwargs)
    stage = feature_stages(model)[2].module_name
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    kept = []
    handle = dict(model.named_modules())[stage].register_forward_hook(lambda m, i, out: kept.append(out))
    torch.manual_seed(1)     # stochastic depth draws the same in both forwards
    loss = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, kept[0])
    handle.remove()
    out = kept[0].detach()
    by_hand = [[out.select(channel_axis, c)[b].norm().item() for c in range(out.shape[channel_axis])]
               for b in range(3)]
    grad_by_hand = [[grad.select(channel_axis, c)[b].norm().item() for c in range(out.shape[channel_axis])]
                    for b in range(3)]
    model.zero_grad(set_to_none=True)
    tracker = FilterNormTracker(model, stages=[stage], every=1)
    torch.manual_seed(1)
    record = _tracked_step(model, tracker, x, y)
    np.testing.assert_allclose(record["stages"][stage]["act_norm"], np.mean(by_hand, 0), rtol=1e-5)
    np.testing.assert_allclose(record["stages"][stage]["grad_norm"], np.mean(grad_by_hand, 0), rtol=1e-4, atol=1e-10)


def test_activation_maps_of_an_nhwc_stage_are_drawn_per_channel_and_token_maps_refused():
    from catchup.analysis.activations import activation_figure, stage_output
    from tests.model_families import FAMILIES, create
    name, kwargs, size, _ = FAMILIES["swin"]
    model = create(name, kwargs).eval()
    stage = feature_stages(model)[2]
    x, y = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    kept = []
    handle = dict(model.named_modules())[stage.module_name].register_forward_hook(lambda m, i, out: kept.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    feats, _ = stage_output(model, x, stage.module_name)
    assert feats.shape[1] == stage.channels == kept[0].shape[3]
    for c in (0, 5, stage.channels - 1):
        assert torch.equal(feats[:, c], kept[0][..., c])     # channel c of the NHWC map, drawn as an h x w map
    fig = activation_figure(model, x, y, mean=(0.5,) * 3, std=(0.5,) * 3, stage=stage.module_name, topk=2)
    assert len(fig.axes) == 2 * (2 + 2 * 2)
    name, kwargs, size, _ = FAMILIES["vit"]
    vit = create(name, kwargs).eval()
    with pytest.raises(CatchupError, match="not a spatial feature map"):
        stage_output(vit, torch.randn(2, 3, size, size), feature_stages(vit)[1].module_name)


def test_tracker_measures_the_mixed_output_whatever_the_hook_order():
    model, (x, y) = _tiny_resnet(), _batch()
    stage, lam = "stages.1", 0.4
    index = torch.arange(7, -1, -1)
    mix = lambda h: catchup_mix(h, index, lam)[0]               # noqa: E731
    tracker = FilterNormTracker(model, stages=[stage], every=1)  # registered before the mixing hook
    hooks = StageHooks(model, resolve_stages(model, [stage]), lambda h, plan: mix(h))
    hooks.arm(MixPlan(layer=1, lam=lam, index=index, lam_eff=lam))
    record = _tracked_step(model, tracker, x, y)
    hooks.remove()
    act, grad = _direct_norms(model, stage, x, y, replace=mix)
    plain_act, _ = _direct_norms(model, stage, x, y)
    np.testing.assert_allclose(record["stages"][stage]["act_norm"], act, rtol=1e-5)
    np.testing.assert_allclose(record["stages"][stage]["grad_norm"], grad, rtol=1e-4, atol=1e-10)
    assert not np.allclose(act, plain_act, rtol=1e-3)            # the mixed map really differs from the plain one


def test_tracker_is_idle_off_schedule_and_averages_micro_batches():
    import copy
    model, (x, y) = _tiny_resnet(), _batch()
    tracker = FilterNormTracker(model, stages=["stem"], every=4)
    ema = copy.deepcopy(model)                                   # carries the hooks along, must not record
    assert not tracker.begin_step(3) and not tracker.active
    nn.functional.cross_entropy(model(x), y).backward()
    assert tracker.end_step() is None and tracker.records == []
    tracker.begin_step(4)
    for half in (slice(0, 4), slice(4, 8)):                      # gradient accumulation: two micro-batches
        nn.functional.cross_entropy(model(x[half]), y[half]).backward()
    ema(x[:3])
    model.eval()(x[:3])                                            # an eval pass inside the step is not recorded
    model.train()
    record = tracker.end_step()
    halves = [_direct_norms(model, "stem", x[h], y[h]) for h in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(record["stages"]["stem"]["act_norm"], (halves[0][0] + halves[1][0]) / 2, rtol=1e-5)
    np.testing.assert_allclose(record["stages"]["stem"]["grad_norm"], (halves[0][1] + halves[1][1]) / 2,
                               rtol=1e-4)


def test_tracker_save_load_and_wandb_payload(tmp_path):
    import wandb
    model, (x, y) = _tiny_resnet(), _batch()
    tracker = FilterNormTracker(model, stages=["stages.0", "stages.2"], every=2)
    records = [_tracked_step(model, tracker, x, y, step) for step in (0, 2, 4)]
    data = load_filter_norms(tracker.save(tmp_path / "norms.npz"))
    assert list(data) == ["stages.0", "stages.2"]
    assert data["stages.2"]["steps"].tolist() == [0, 2, 4]
    assert data["stages.2"]["act_norm"].shape == data["stages.2"]["grad_norm"].shape == (3, 16)
    np.testing.assert_array_equal(data["stages.0"]["grad_norm"][1], records[1]["stages"]["stages.0"]["grad_norm"])
    resumed = FilterNormTracker(model, stages=["stages.0", "stages.2"], every=2)
    _tracked_step(model, resumed, x, y, 6)
    resumed.load(tmp_path / "norms.npz")
    assert [r["step"] for r in resumed.records] == [0, 2, 4, 6]
    np.testing.assert_array_equal(resumed.records[1]["stages"]["stages.2"]["act_norm"],
                                  records[1]["stages"]["stages.2"]["act_norm"])
    payload = tracker.wandb_payload(records[-1])
    assert isinstance(payload["filters/stages.0/act_norm"], wandb.Histogram)
    assert isinstance(payload["filters/stages.2/grad_norm"], wandb.Histogram)
    assert isinstance(payload["filters/norm_vs_grad"], wandb.Image)
    with pytest.raises(CatchupError, match="no module"):
        FilterNormTracker(model, stages=["layer9"])


# --- command line on a real run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "run"
    run_train(out, "--epochs", "1")
    return out


def test_cli_activations_writes_the_grid(run_dir, tmp_path):
    assert analysis_main(["activations", "--run", str(run_dir), "--images", "2", "--stage", "stages.0"]) == 0
    assert (run_dir / "analysis" / "activations.png").stat().st_size > 1000
    assert analysis_main(["activations", "--run", str(tmp_path / "missing")]) == 2


def test_cli_landscape_writes_npz_and_pictures(run_dir, tmp_path):
    out = tmp_path / "land"
    assert analysis_main(["landscape", "--run", str(run_dir), "--batches", "1", "--batch-size", "16", "--steps",
                          "3", "--iters", "3", "--output", str(out)]) == 0
    with np.load(out / "landscape.npz") as data:
        assert data["labels"].tolist() == ["run"]
        assert data["run/loss_2d"].shape == (3, 3)
        assert data["run/loss_1d"][1] == pytest.approx(float(data["run/loss"]), rel=1e-6)
    assert (out / "landscape.png").exists() and (out / "landscape_surface.png").exists()


def test_cli_filters_plots_tracker_files(tmp_path):
    model, (x, y) = _tiny_resnet(), _batch()
    tracker = FilterNormTracker(model, every=1)
    for step in range(2):
        _tracked_step(model, tracker, x, y, step)
    path = tracker.save(tmp_path / "a" / "filter_norms.npz")
    assert analysis_main(["filters", "--npz", str(path), "--npz", str(path), "--labels", "x", "y"]) == 0
    assert (tmp_path / "a" / "filter_norms.png").stat().st_size > 1000
    assert analysis_main(["filters", "--npz", str(path), "--labels", "x", "y"]) == 2
