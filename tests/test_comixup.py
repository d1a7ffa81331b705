"""Co-Mixup: the objective, the graph cut, masks and outputs, soft targets, diversity, training, replay, errors.

Masks, images and targets are checked against loops over outputs, blocks and inputs; the graph cut against
every alpha-beta swap move of a written-out energy.
"""
import copy

import numpy as np
import pytest
import timm
import torch

from catchup import CatchupError
from catchup.mix.comixup import CoMixup, comixup, comixup_labelling, comixup_objective, graphcut_labels
from tests.helpers import train_step


def peaky_saliency(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """One Gaussian bump per image at a random place: saliency concentrated as on real objects."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(b, 2, generator=g) * size
    grid = torch.arange(size).float()
    d2 = ((grid.view(1, -1, 1) - centres[:, 0].view(-1, 1, 1)) ** 2
          + (grid.view(1, 1, -1) - centres[:, 1].view(-1, 1, 1)) ** 2)
    return torch.exp(-d2 / 40.0) + 0.01 * torch.rand(b, size, size, generator=g)


def test_objective_matches_a_loop():
    rng = np.random.default_rng(0)
    m, n, beta, gamma = 3, 3, 0.3, 0.7
    cost = rng.random((m, n, n))
    mask = np.eye(m)[rng.integers(0, m, (m, n, n))]
    mask[0, 1, 1] = [0.5, 0.5, 0.0]                       # a blended block
    expected = 0.0
    for o in range(m):
        for r in range(n):
            for c in range(n):
                expected += sum(cost[j, r, c] * mask[o, r, c, j] for j in range(m))
                for rr, cc in ((r + 1, c), (r, c + 1)):
                    if rr < n and cc < n:
                        expected += beta / 2 * sum((mask[o, r, c, j] - mask[o, rr, cc, j]) ** 2 for j in range(m))
    usage = [[mask[o, :, :, j].sum() for j in range(m)] for o in range(m)]
    expected += gamma * sum(usage[o][j] * usage[p][j] for o in range(m) for p in range(m) if o != p for j in range(m))
    assert comixup_objective(cost, mask, beta, gamma) == pytest.approx(expected)


def _energy(labels, unary, members, beta):
    """Unary of each block's label (a blend costs its pair's mean - 5e-4) + beta * Potts-like edge costs."""
    m = unary.shape[-1]
    pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]   # (0,1), (0,2), (1,2): official order

    def cost(r, c, lab):
        if lab < m:
            return unary[r, c, lab]
        a, b = pairs[lab - m]
        return (unary[r, c, a] + unary[r, c, b]) / 2 - 5e-4

    def edge(a, b):
        if a == b:
            return 0.0
        if a >= m > b or b >= m > a:
            blend, single = (a, b) if a >= m else (b, a)
            return 0.25 if single in pairs[blend - m] else 1.0
        return 1.0
    n = labels.shape[0]
    total = sum(cost(r, c, labels[r, c]) for r in range(n) for c in range(n))
    total += beta * sum(edge(labels[r, c], labels[r + 1, c]) for r in range(n - 1) for c in range(n))
    return total + beta * sum(edge(labels[r, c], labels[r, c + 1]) for r in range(n) for c in range(n - 1))


@pytest.mark.parametrize("used", [0, 2, 3])
def test_graph_cut_admits_no_better_swap_move(used):
    """alpha-beta swap (as the official code): no single swap move of the written-out energy does better."""
    rng = np.random.default_rng(used)
    m, n, beta = 4, 2, 0.05
    for _ in range(5):
        unary = -rng.random((n, n, m)) / 4
        count = np.zeros(m)
        count[rng.choice(m, used, replace=False)] = rng.integers(1, 4, used)
        labels, table = graphcut_labels(unary, count, beta, blend=used > 0)
        members = list(np.flatnonzero(count))
        assert table.shape == (m + {0: 0, 2: 1, 3: 3}[used], m) and np.allclose(table.sum(1), 1)
        energy = _energy(labels, unary, members, beta)
        best = np.inf
        for a in range(len(table)):
            for b in range(a + 1, len(table)):
                free = [(r, c) for r in range(n) for c in range(n) if labels[r, c] in (a, b)]
                for choice in np.ndindex(*(2,) * len(free)):
                    other = labels.copy()
                    for (r, c), k in zip(free, choice):
                        other[r, c] = (a, b)[k]
                    best = min(best, _energy(other, unary, members, beta))
        assert energy <= best + 1e-3


def test_outputs_follow_their_masks_blockwise_within_partitions():
    torch.manual_seed(0)
    b, size, block_num = 10, 32, 4
    x = torch.randn(b, 3, size, size)
    out, mask = comixup(x, peaky_saliency(b), np.random.default_rng(0), block_num=block_num, part_size=4)
    assert out.shape == x.shape and mask.shape == (b, block_num, block_num, b)
    assert set(torch.unique(mask).tolist()) <= {0.0, 0.5, 1.0}
    assert torch.allclose(mask.sum(-1), torch.ones(b, block_num, block_num))
    step = size // block_num
    for o in range(b):
        part = range(4 * (o // 4), min(4 * (o // 4) + 4, b))      # partitions of 4, 4 and 2 inputs
        for r in range(block_num):
            for c in range(block_num):
                w = mask[o, r, c]
                assert all(w[j] == 0 for j in range(b) if j not in part)
                cell = out[o, :, r * step:(r + 1) * step, c * step:(c + 1) * step]
                sources = [j for j in range(b) if torch.equal(cell, x[j, :, r * step:(r + 1) * step,
                                                                     c * step:(c + 1) * step])]
                if w.max() == 1:      # the whole block comes from exactly the one input its mask names
                    assert sources == [int(w.argmax())]
                else:
                    blend = sum(w[j] * x[j, :, r * step:(r + 1) * step, c * step:(c + 1) * step] for j in range(b))
                    assert sources == [] and torch.allclose(cell, blend, atol=1e-6)
    shares = mask.mean((1, 2))
    assert (shares > 0).sum(1).max() >= 2      # concentrated saliency: outputs combine several inputs


def _overlap(mask: np.ndarray) -> float:
    usage = mask.reshape(mask.shape[0], -1, mask.shape[-1]).sum(1)
    return float((usage.sum(0) ** 2).sum() - (usage ** 2).sum())


def test_diversity_term_lowers_the_overlap_of_input_usage():
    for seed in range(3):
        sal = torch.nn.functional.avg_pool2d(peaky_saliency(8, seed=seed)[:, None], 8)[:, 0].double().numpy()
        cost = -sal / sal.reshape(8, -1).sum(1)[:, None, None]
        runs = {g: comixup_labelling(cost, np.eye(8), np.random.default_rng(seed), gamma=g)[0] for g in (0.0, 1.0)}
        assert _overlap(runs[1.0]) < 0.75 * _overlap(runs[0.0])


def model_and_batch(b: int, seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=5)
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 5, (b,), generator=g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_are_the_mask_area_shares(smoothing):
    model, x, y = model_and_batch(6)
    mixer = CoMixup(model, num_classes=5, label_smoothing=smoothing, part_size=3, seed=1)
    mixer._saliency = lambda x, target: peaky_saliency(6)   # concentrated saliency, so outputs mix inputs
    xm, soft, plan = mixer.prepare(x, y)
    mask = plan.extras["mask"]
    off, on = smoothing / 5, 1 - smoothing + smoothing / 5
    for o in range(6):
        expected = torch.zeros(5, dtype=torch.float64)
        for r in range(4):
            for c in range(4):
                for j in range(6):
                    row = torch.tensor([on if k == y[j] else off for k in range(5)], dtype=torch.float64)
                    expected += float(mask[o, r, c, j]) / 16 * row
        assert torch.allclose(soft[o].double(), expected, atol=1e-6)
        shares = mask[o].mean((0, 1))
        assert int(plan.index[o]) == int(shares.argmax())
    assert torch.allclose(soft.sum(1), torch.ones(6))
    assert (mask.mean((1, 2)) > 0).sum(1).max() >= 2
    assert plan.lam_eff == pytest.approx(float(mask.mean((1, 2)).max(1).values.mean()))


@pytest.mark.parametrize("clean_lam", [0.0, 1.0])
def test_trains_timm_resnet18_with_odd_batches(clean_lam):
    from catchup import build_mixer
    model, _, _ = model_and_batch(1)
    mixer = build_mixer("comixup", model, num_classes=5, clean_lam=clean_lam, block_num=-1, seed=0)
    for b in (5, 7):
        _, x, y = model_and_batch(b, seed=b)
        model.zero_grad()
        xm, soft, loss, aux = train_step(mixer, model, x, y)
        assert xm.shape == x.shape and soft.shape == (b, 5) and torch.isfinite(loss)
        assert (aux is None) == (clean_lam == 0)
        assert model.get_classifier().weight.grad is not None
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    mixer.enabled = False
    xm, soft = mixer(x, y)
    assert torch.equal(xm, x) and mixer.last_plan is None and mixer.auxiliary_loss(None) is None


def test_state_dict_round_trip_replays():
    model, _, _ = model_and_batch(1)
    model.eval()                 # fixed model, so replays see the same saliency
    mixer = CoMixup(model, num_classes=5, seed=3, part_size=4, block_num=-1)
    for step in range(2):
        _, x, y = model_and_batch(5, seed=step)
        mixer(x, y)
    state = copy.deepcopy(mixer.state_dict())

    def run():
        outs = []
        for step in range(2, 5):
            _, x, y = model_and_batch(4 + step % 2, seed=step)
            xm, soft = mixer(x, y)
            outs.append((xm, soft, mixer.auxiliary_loss(None)))
        return outs

    first = run()
    mixer.load_state_dict(state)
    for (a, s, l), (b, t, m) in zip(first, run()):
        assert torch.equal(a, b) and torch.equal(s, t) and torch.equal(l, m)


@pytest.mark.parametrize("kwargs,message", [
    (dict(thres_type="medium"), "thres_type"),
    (dict(block_num=3), "block_num"),
    (dict(part_size=1), "part_size"),
    (dict(omega=2.0), "omega"),
    (dict(layers=[1]), "only the input"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    model, _, _ = model_and_batch(1)
    with pytest.raises(CatchupError, match=message) as err:
        CoMixup(model, num_classes=5, **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(CatchupError, match="with the model"):
        CoMixup(None, num_classes=5)


def test_bad_inputs_are_one_line_errors():
    model, _, _ = model_and_batch(1)
    mixer = CoMixup(model, num_classes=5, block_num=8)
    with pytest.raises(CatchupError, match="divisible by block_num 8"):
        mixer.prepare(torch.randn(2, 3, 36, 36), torch.tensor([0, 1]))
    with pytest.raises(CatchupError, match="collate_fn"):
        mixer.collate([(torch.randn(3, 32, 32), 0)])
