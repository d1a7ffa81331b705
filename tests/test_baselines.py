"""The further baselines: SaliencyMix, ResizeMix, SnapMix, AlignMixup, RecursiveMix.

Each method's defining property is checked against an independent computation (loops, numpy/scipy, hand
examples); then every method runs end to end on small models and on timm's resnet18.
"""
import copy
import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from catchup import CatchupError, build_mixer
from catchup.mix import MIXERS
from catchup.mix.alignmix import alignmix, sinkhorn_plan, transport_cost
from catchup.mix.puzzlemix import _graphcut, input_saliency, mask_transport, puzzlemix, transport_image
from catchup.mix.recursivemix import recursive_mix, recursive_target
from catchup.mix.saliencymix import fine_grained_saliency, saliency_map, saliency_peak, spectral_residual_saliency
from tests.helpers import HeadNet, train_step

METHODS = ["saliencymix", "resizemix", "snapmix", "alignmix", "recursivemix", "puzzlemix"]


def batch(b=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.arange(b) % 5


def blob_images(centres, size=32, seed=0, noise=0.1):
    """Noisy flat images, each with one bright 4x4 square centred at (cy, cx)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + noise * torch.rand(len(centres), 3, size, size, generator=g)
    for i, (cy, cx) in enumerate(centres):
        x[i, :, cy - 2:cy + 2, cx - 2:cx + 2] += 1.0
    return x


def inside(point, box):
    (py, px), (y0, y1, x0, x1) = point, box
    return y0 <= py < y1 and x0 <= px < x1


# ---- SaliencyMix -------------------------------------------------------------------------------------

def test_spectral_residual_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    gray = rng.random((2, 64, 64)) + np.pad(np.ones((6, 6)), ((30, 28), (10, 48)))[None]  # 64 px: no resizing
    ref = []
    for g in gray:
        spectrum = np.fft.fft2(g)
        amp = np.maximum(np.abs(spectrum), 1e-4 * np.abs(spectrum).max())
        residual = np.log(amp) - ndimage.uniform_filter(np.log(amp), size=3, mode="mirror")
        sal = np.abs(np.fft.ifft2(np.exp(residual) * spectrum / amp))
        sal = ndimage.gaussian_filter(sal, sigma=8, mode="mirror", truncate=0.25) ** 2   # 5 taps, as OpenCV
        ref.append(sal / sal.max())
    ours = spectral_residual_saliency(torch.from_numpy(gray).float())
    assert np.allclose(ours.numpy(), np.stack(ref), atol=1e-4)


def test_fine_grained_saliency_matches_a_loop_over_pixels():
    rng = np.random.default_rng(1)
    gray = rng.random((9, 11)) * 4
    g = gray
    for _ in range(2):
        g = ndimage.convolve1d(ndimage.convolve1d(g, [0.25, 0.5, 0.25], axis=0, mode="mirror"),
                               [0.25, 0.5, 0.25], axis=1, mode="mirror")
    on, off = np.zeros_like(g), np.zeros_like(g)
    for n in (12, 24, 48, 28, 56, 112):
        for y in range(g.shape[0]):
            for x in range(g.shape[1]):
                y1, y2 = max(y - n + 1, 0), min(y + n + 1, g.shape[0])
                x1, x2 = max(x - n + 1, 0), min(x + n + 1, g.shape[1])
                surround = (g[y1:y2, x1:x2].sum() - g[y, x]) / ((y2 - y1) * (x2 - x1) - 1)
                on[y, x] += max(g[y, x] - surround, 0)
                off[y, x] += max(surround - g[y, x], 0)
    expected = on / on.max() + off / off.max()
    ours = fine_grained_saliency(torch.from_numpy(gray)[None])[0].numpy()
    assert np.allclose(ours, expected / expected.max(), atol=1e-5)


def test_saliency_of_a_single_blob_peaks_on_the_blob():
    centres = [(21, 9), (8, 8), (16, 16), (24, 22), (10, 23), (5, 27)]
    peaks = saliency_peak(saliency_map(blob_images(centres)))
    for (cy, cx), (py, px) in zip(centres, peaks.tolist()):
        assert cy - 3 <= py <= cy + 2 and cx - 3 <= px <= cx + 2


@pytest.mark.parametrize("per_sample", [False, True])
def test_saliencymix_box_holds_the_partner_peak_and_lam_is_the_kept_area(per_sample):
    x = blob_images([(21, 9), (8, 8), (16, 16), (24, 22), (10, 23)], seed=3)
    y = torch.arange(5)
    mixer = build_mixer("saliencymix", num_classes=5, prob=1.0, per_sample=per_sample, seed=2)
    peaks = saliency_peak(saliency_map(x)).tolist()
    for _ in range(10):
        mixed, target, plan = mixer.prepare(x, y)
        boxes = plan.extras["boxes"].tolist()
        for i in range(5):
            j = int(plan.index[i])
            y0, y1, x0, x1 = boxes[i]
            side = int(32 * math.sqrt(1 - plan.lam))
            assert y1 - y0 <= side and x1 - x0 <= side          # CutMix's size, clipped to the image
            if side >= 1:
                assert inside(peaks[j] if per_sample else peaks[int(plan.index[0])], boxes[i])
            own = torch.ones(32, 32, dtype=torch.bool)
            own[y0:y1, x0:x1] = False
            assert torch.equal(mixed[i][:, ~own], x[j][:, ~own]) and torch.equal(mixed[i][:, own], x[i][:, own])
            kept = own.float().mean().item()
            if j != i:
                assert target[i, i].item() == pytest.approx(kept, abs=1e-6)
                assert target[i, j].item() == pytest.approx(1 - kept, abs=1e-6)
        if not per_sample:
            assert len({tuple(b) for b in boxes}) == 1             # one box for the batch, as the official code


# ---- ResizeMix --------------------------------------------------------------------------------------

def test_resizemix_pastes_the_resized_partner_and_weights_labels_by_area():
    x, y = batch(b=5, size=20)
    mixer = build_mixer("resizemix", num_classes=5, seed=0)
    sides = []
    for _ in range(20):
        mixed, target, plan = mixer.prepare(x, y)
        y0, y1, x0, x1 = plan.extras["box"]
        sides.append((y1 - y0) / 20)
        pasted = F.interpolate(x[plan.index], size=(y1 - y0, x1 - x0), mode="nearest")
        assert torch.equal(mixed[..., y0:y1, x0:x1], pasted)
        outside = torch.ones(20, 20, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(mixed[..., outside], x[..., outside])
        share = (y1 - y0) * (x1 - x0) / 400
        for i in range(5):
            j = int(plan.index[i])
            if j != i:
                assert target[i, y[j]].item() == pytest.approx(share)
                assert target[i, y[i]].item() == pytest.approx(1 - share)
    assert 0.1 - 0.05 <= min(sides) and max(sides) <= 0.8


# ---- SnapMix ----------------------------------------------------------------------------------------

def test_snapmix_label_weights_are_the_cam_mass_shares():
    torch.manual_seed(0)
    model = HeadNet()
    x, y = batch(b=5, size=16, seed=4)
    mixer = build_mixer("snapmix", model, num_classes=5, seed=1, prob=1.0)
    features = F.relu(model.forward_features(x)).detach()
    w, bias = model.fc.weight.detach(), model.fc.bias.detach()
    cams = []
    for i in range(5):                         # CAM of each sample's own class, pixel by pixel
        k = int(y[i])
        cam = torch.zeros(features.shape[-2:])
        for p in range(cam.shape[0]):
            for q in range(cam.shape[1]):
                cam[p, q] = (features[i, :, p, q] * w[k]).sum() + bias[k]
        cam = F.interpolate(cam[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        cams.append(cam - cam.min())
    checked = 0
    for _ in range(6):
        mixed, target, plan = mixer.prepare(x, y)
        (y0, y1, x0, x1), (v0, v1, u0, u1) = plan.extras["box"], plan.extras["partner_box"]
        if y1 == y0 or x1 == x0 or v1 == v0 or u1 == u0:
            continue
        for i in range(5):
            j = int(plan.index[i])
            own = 1 - cams[i][y0:y1, x0:x1].sum() / cams[i].sum()
            partner = cams[j][v0:v1, u0:u1].sum() / cams[j].sum()
            if j != i:
                assert target[i, y[i]].item() == pytest.approx(own.item(), abs=1e-5)
                assert target[i, y[j]].item() == pytest.approx(partner.item(), abs=1e-5)
            patch = F.interpolate(x[j:j + 1, :, v0:v1, u0:u1], size=(y1 - y0, x1 - x0), mode="bilinear",
                                  align_corners=True)[0]
            assert torch.allclose(mixed[i, :, y0:y1, x0:x1], patch)
            checked += 1
    assert checked >= 10


def test_snapmix_needs_a_linear_classifier_and_the_live_model():
    model = HeadNet()
    model.fc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))
    model.get_classifier = lambda: model.fc
    with pytest.raises(CatchupError, match="nn.Linear") as err:
        build_mixer("snapmix", model, num_classes=5)
    assert "\n" not in str(err.value)
    with pytest.raises(CatchupError, match="model"):
        build_mixer("snapmix", num_classes=5)
    with pytest.raises(CatchupError, match="collate"):
        build_mixer("snapmix", HeadNet(), num_classes=5).collate([(torch.randn(3, 8, 8), 0)] * 2)


# ---- AlignMixup -------------------------------------------------------------------------------------

def test_sinkhorn_plan_has_uniform_marginals():
    g = torch.Generator().manual_seed(0)
    a, b = 0.5 * torch.randn(3, 9, 6, generator=g), 0.5 * torch.randn(3, 7, 6, generator=g)
    plan = sinkhorn_plan(transport_cost(a, b))
    assert torch.allclose(plan.sum(-1), torch.full((3, 9), 1 / 9), atol=1e-3)
    assert torch.allclose(plan.sum(-2), torch.full((3, 7), 1 / 7), atol=1e-3)
    cost = ((a[:, :, None] - b[:, None]) ** 2).sum(-1)     # the cost by broadcasting, not the expansion
    assert torch.allclose(transport_cost(a, b), cost, atol=1e-4)


def test_alignment_of_identical_or_shuffled_maps_is_the_permutation():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 6, 3, 3, generator=g)
    plan = sinkhorn_plan(transport_cost(h.flatten(2).mT, h.flatten(2).mT)) * 9
    assert torch.allclose(plan, torch.eye(9).expand(1, 9, 9), atol=1e-3)
    perm = torch.randperm(9, generator=g)
    shuffled = h.flatten(2)[..., perm].reshape(1, 6, 3, 3)     # the same vectors, other positions
    pair = torch.cat([h, shuffled])
    index = torch.tensor([1, 0])
    for direction in (0, 1):
        out = alignmix(pair, index, 0.3, direction)
        # aligning a shuffled copy undoes the shuffle: the mix is the map itself in the kept geometry
        kept = pair if direction == 0 else pair[index]
        assert torch.allclose(out, kept, atol=1e-3)


def test_alignmix_mixes_the_last_stage_with_both_directions_and_input_mixup():
    model = HeadNet()
    captured = {}     # registered before the mixer's hook, so it sees the stage output before mixing
    model.c.register_forward_hook(lambda m, i, o: captured.__setitem__("c", o.detach().clone()))
    model.global_pool.register_forward_pre_hook(lambda m, i: captured.__setitem__("mixed", i[0].detach().clone()))
    mixer = build_mixer("alignmix", model, num_classes=5, seed=0)
    assert [s.module_name for s in mixer.stages] == [None, "c"]
    x, y = batch()
    seen = set()
    for _ in range(30):
        xm, target, plan = mixer.prepare(x, y)
        mixer.arm(plan)
        model(xm)
        if plan.layer == 0:
            assert torch.allclose(xm, plan.lam * x + (1 - plan.lam) * x[plan.index])
            seen.add("input")
            continue
        direction = plan.extras["direction"]
        expected = alignmix(captured["c"], plan.index, plan.lam, direction)
        assert torch.allclose(captured["mixed"], expected, atol=1e-5)
        seen.add(direction)
    assert seen == {"input", 0, 1}


# ---- RecursiveMix -----------------------------------------------------------------------------------

def test_recursive_label_math_by_hand():
    x, old_x = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 8, 8)
    y, old_y = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.2, 0.8, 0.0]])
    out, lam = recursive_mix(x, old_x, (0, 2, 1, 3))
    assert lam == 0.75 and torch.allclose(recursive_target(y, old_y, lam), torch.tensor([[0.8, 0.2, 0.0]]))
    assert out.sum() == 4 and torch.equal(out[0, 0, 0:2, 1:3], torch.ones(2, 2))


def test_recursivemix_pastes_the_previous_mixed_batch_and_recurses_on_its_labels():
    mixer = build_mixer("recursivemix", HeadNet(), num_classes=5, seed=3)
    first, y1 = batch(b=4, seed=1)
    mixed, target, plan = mixer.prepare(first, y1)
    assert plan is None and torch.equal(mixed, first) and torch.equal(target, F.one_hot(y1, 5).float())
    previous_x, previous_target = mixed, target
    for step in range(2, 8):
        x, _ = batch(b=4, seed=step)
        y = (torch.arange(4) + step) % 5          # other labels each step
        mixed, target, plan = mixer.prepare(x, y)
        y0, y1_, x0, x1 = plan.extras["box"]
        share = (y1_ - y0) * (x1 - x0) / 256
        assert 0 <= share <= 0.5
        if share:
            pasted = F.interpolate(previous_x, size=(y1_ - y0, x1 - x0), mode="nearest")
            assert torch.equal(mixed[..., y0:y1_, x0:x1], pasted)
        assert torch.allclose(target, (1 - share) * F.one_hot(y, 5).float() + share * previous_target)
        previous_x, previous_target = mixed, target
    assert (previous_target > 0).sum() > 4        # labels of earlier batches live on through the recursion


def test_recursivemix_consistency_term():
    torch.manual_seed(0)
    model = HeadNet(stride=1)                     # a stride-1 map: RoIAlign of a box is the mean of its pixels
    mixer = build_mixer("recursivemix", model, num_classes=5, omega=0.5, seed=0)
    x, y = batch(b=3, size=12)
    mixer(x, y)
    mixer.auxiliary_loss(model(x))
    for step in range(5):
        x, y = batch(b=3, size=12, seed=step + 1)
        old_logits = mixer.state_dict()["history"]["logits"]
        xm, target = mixer(x, y)
        plan_box = mixer._pending["box"] if mixer._pending else None
        out = model(xm)
        aux = mixer.auxiliary_loss(out)
        if plan_box is None:
            assert aux is None
            continue
        y0, y1, x0, x1 = plan_box
        roi = model.forward_features(xm)[..., y0:y1, x0:x1].mean((2, 3))
        log_q = model.fc(roi).log_softmax(-1)
        p = old_logits.softmax(-1)
        lam = 1 - (y1 - y0) * (x1 - x0) / 144
        expected = 0.5 * (1 - lam) * (p * (p.log() - log_q)).sum(-1).mean()
        assert aux.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    # agreeing predictions: a head that ignores its input predicts the same everywhere -> the term is zero
    with torch.no_grad():
        model.fc.weight.zero_()
    mixer(x, y)
    mixer.auxiliary_loss(model(x))
    for step in range(4):
        xm, _ = mixer(*batch(b=3, size=12, seed=10 + step))
        aux = mixer.auxiliary_loss(model(xm))
        assert aux is None or abs(aux.item()) < 1e-6


def test_recursivemix_handles_changing_batch_sizes():
    model = HeadNet()
    mixer = build_mixer("recursivemix", model, num_classes=5, seed=5)
    for b in (6, 4, 7, 1, 5):
        x, y = batch(b=b, seed=b)
        history = mixer.state_dict()["history"]["x"]
        xm, target, plan = mixer.prepare(x, y)
        mixer.arm(plan)
        out = model(xm)
        aux = mixer.auxiliary_loss(out)
        assert out.shape == (b, 5) and target.shape == (b, 5)
        if plan is not None:
            rows = torch.arange(b) % history.shape[0]
            y0, y1, x0, x1 = plan.extras["box"]
            if y1 > y0 and x1 > x0:
                pasted = F.interpolate(history[rows], size=(y1 - y0, x1 - x0), mode="nearest")
                assert torch.equal(xm[..., y0:y1, x0:x1], pasted)
            assert aux is None or torch.isfinite(aux)


def test_recursivemix_without_a_pooling_head_skips_the_term():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with pytest.warns(UserWarning, match="skipped"):
        mixer = build_mixer("recursivemix", plain, num_classes=5)
    for step in range(3):
        xm, target = mixer(*batch(b=3, seed=step))
        assert mixer.auxiliary_loss(plain(xm)) is None


def test_recursivemix_hook_ignores_eval_and_ema_copies():
    model = HeadNet()
    mixer = build_mixer("recursivemix", model, num_classes=5, seed=0)
    x, y = batch()
    mixer(x, y)
    mixer.auxiliary_loss(model(x))
    ema = copy.deepcopy(model)
    mixer(*batch(seed=1))
    ema(x)                                       # the copy's hook is not this mixer's pooling module
    model.eval()
    model(x)
    assert mixer._features is None
    model.train()
    model(x)
    assert mixer._features is not None or mixer._pending is None


# ---- PuzzleMix -------------------------------------------------------------------------------------

def _puzzle_energy(lab, own, partner, pw_x, pw_y, prior, beta, n_labels):
    """The graph-cut energy, written out: label l keeps a share 1 - l/(L-1) of the sample's own block."""
    top = n_labels - 1
    energy = sum((lab[i, j] / top) * own[i, j] + (1 - lab[i, j] / top) * partner[i, j] + prior[lab[i, j]]
                 for i in range(2) for j in range(2))
    energy += sum((pw_x[0, j] + beta) * (lab[0, j] - lab[1, j]) ** 2 / top ** 2 for j in range(2))
    energy += sum((pw_y[i, 0] + beta) * (lab[i, 0] - lab[i, 1]) ** 2 / top ** 2 for i in range(2))
    return energy


@pytest.mark.parametrize("n_labels", [2, 3])
def test_puzzlemix_graph_cut_minimises_the_energy(n_labels):
    """Two labels: the exact minimum over all labellings of 2 x 2 blocks. Three labels (alpha-beta swap, as
    the official code): no single swap move lowers the energy (up to the solver's integer rounding)."""
    rng = np.random.default_rng(0)
    for trial in range(8):
        own, partner = rng.random((2, 2, 2)) / 4
        pw_x, pw_y = rng.random((1, 2)) * 0.05, rng.random((2, 1)) * 0.05
        lam, beta, eta = rng.uniform(0.1, 0.9), 0.02, 0.2
        probs = [math.comb(n_labels - 1, l) * lam ** (n_labels - 1 - l) * (1 - lam) ** l for l in range(n_labels)]
        prior = -np.log(np.array(probs) + 1e-8) * eta / 4
        mask = _graphcut(own, partner, pw_x, pw_y, lam, beta, eta, n_labels)
        lab = np.rint((1 - mask) * (n_labels - 1)).astype(int)
        energy = _puzzle_energy(lab, own, partner, pw_x, pw_y, prior, beta, n_labels)
        if n_labels == 2:
            moves = [np.array(flat).reshape(2, 2) for flat in np.ndindex(*(2,) * 4)]
        else:
            moves = []
            for a in range(n_labels):
                for b in range(a + 1, n_labels):
                    free = [(i, j) for i in range(2) for j in range(2) if lab[i, j] in (a, b)]
                    for choice in np.ndindex(*(2,) * len(free)):
                        other = lab.copy()
                        for (i, j), c in zip(free, choice):
                            other[i, j] = (a, b)[c]
                        moves.append(other)
        best = min(_puzzle_energy(m, own, partner, pw_x, pw_y, prior, beta, n_labels) for m in moves)
        assert energy <= best + 1e-4


def test_transport_moves_blocks_and_brings_salient_blocks_into_view():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 8, 8, generator=g)
    perm = torch.randperm(16, generator=g)
    plan = torch.zeros(1, 16, 16)
    plan[0, torch.arange(16), perm] = 1                 # source block i goes to destination perm[i]
    moved = transport_image(img, plan, 4)
    for i in range(16):
        (sy, sx), (dy, dx) = divmod(i, 4), divmod(int(perm[i]), 4)
        source = img[0, :, 2 * sy:2 * sy + 2, 2 * sx:2 * sx + 2]
        assert torch.equal(moved[0, :, 2 * dy:2 * dy + 2, 2 * dx:2 * dx + 2], source)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1                               # only the top-left quarter of the image is shown
    saliency = torch.full((1, 4, 4), 0.01)
    saliency[0, 3, 3] = 1.0                             # the salient block sits in the hidden corner
    win = mask_transport(mask, saliency / saliency.sum(), eps=0.1)
    destination = int(win[0, 15].argmax())
    assert win[0, 15].sum() == 1 and divmod(destination, 4)[0] < 2 and divmod(destination, 4)[1] < 2
    assert (win.sum(1) <= 1).all() and (win.sum(2) <= 1).all()   # each destination holds at most one block


def test_puzzlemix_mixes_blockwise_and_weights_labels_by_the_mask():
    torch.manual_seed(0)
    model = HeadNet()
    x, y = batch(b=4, size=16, seed=2)
    saliency = input_saliency(model, x, y)
    assert all(p.grad is None for p in model.parameters()) and model.training
    x_var = x.clone().requires_grad_(True)
    model.eval()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_var), y), x_var)
    model.train()
    assert torch.allclose(saliency, grad.pow(2).mean(1).sqrt())
    index = torch.tensor([1, 2, 3, 0])
    for block_num in (2, 4):
        mixed, own = puzzlemix(x, saliency, index, 0.5, block_num, transport=False)
        side = 16 // block_num
        for i in range(4):
            shares = []
            for by in range(block_num):
                for bx in range(block_num):
                    cell = (slice(None), slice(by * side, (by + 1) * side), slice(bx * side, (bx + 1) * side))
                    fits = [m for m in (0.0, 0.5, 1.0)
                            if torch.allclose(mixed[i][cell], m * x[i][cell] + (1 - m) * x[index[i]][cell], atol=1e-6)]
                    assert fits
                    shares.append(fits[-1] if len(fits) > 1 else fits[0])
            assert own[i].item() == pytest.approx(float(np.mean(shares)))
    mixer = build_mixer("puzzlemix", model, num_classes=5, seed=0)
    xm, target, plan = mixer.prepare(x, y)
    own = plan.own_weight
    for i in range(4):
        j = int(plan.index[i])
        if j != i:
            assert target[i, y[i]].item() == pytest.approx(own[i].item(), abs=1e-6)
    with pytest.raises(CatchupError, match="square"):
        mixer.prepare(torch.randn(2, 3, 16, 12), torch.tensor([0, 1]))


def test_puzzlemix_pads_28_pixel_images_and_weights_labels_by_the_visible_pixels():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28) + 3 * torch.arange(4.0).view(4, 1, 1, 1)   # images differ at every pixel
    saliency = torch.rand(4, 28, 28)
    index = torch.tensor([1, 2, 3, 0])
    partner = x[index]
    for block_num in (2, 4, 8, 16):
        mixed, own = puzzlemix(x, saliency, index, 0.5, block_num, transport=False, fill=(-0.8,), mean=(0.3,),
                               std=(0.35,))
        assert mixed.shape == x.shape
        share = (mixed - partner) / (x - partner)          # each pixel's share of the sample's own image
        assert torch.allclose(share, share.mul(2).round().div(2), atol=1e-5)   # 3 labels: 0, 1/2 or 1
        assert torch.allclose(own, share.mean((1, 2, 3)), atol=1e-5)
    mixed, own = puzzlemix(x, saliency, index, 0.5, 8, transport=True, fill=(-0.8,), mean=(0.3,), std=(0.35,))
    assert mixed.shape == x.shape and torch.isfinite(mixed).all() and ((own >= 0) & (own <= 1)).all()


# ---- every method ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_methods_train_on_small_and_timm_models_with_odd_batches(name):
    torch.manual_seed(0)
    # (a batch of one cannot train resnet18 at 32 px: its 1x1 last stage leaves BatchNorm one value per channel)
    resnet = timm.create_model("resnet18", num_classes=5)
    for model, size, sizes in ((HeadNet(), 16, (3, 1, 5, 3)), (resnet, 32, (3, 5, 3))):
        mixer = build_mixer(name, model, num_classes=5, prob=1.0, seed=0)
        for b in sizes:
            x, y = batch(b=b, size=size, seed=b)
            model.zero_grad()
            xm, soft, loss, _ = train_step(mixer, model, x, y)
            assert xm.shape == x.shape and soft.shape == (b, 5) and torch.isfinite(loss)
            assert model.get_classifier().weight.grad is not None
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["mixup", "cutmix", "manifold", "moex", "catchup", *METHODS])
def test_state_dict_round_trip_replays(name):
    torch.manual_seed(0)
    model = HeadNet()
    mixer = build_mixer(name, model, num_classes=5, prob=1.0, seed=7)
    model.eval()              # fixed model, so replays see the same CAMs and predictions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(2):
            x, y = batch(seed=step)
            xm, _ = mixer(x, y)
            mixer.auxiliary_loss(model(xm))
        state = copy.deepcopy(mixer.state_dict())

        def run():
            outs = []
            for step in range(2, 6):
                x, y = batch(b=4 + step % 2, seed=step)
                xm, soft = mixer(x, y)
                aux = mixer.auxiliary_loss(model(xm))
                outs.append((xm, soft, aux))
            return outs

        first = run()
        mixer.load_state_dict(state)
        again = run()
    for (a, s, l), (b, t, m) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(s, t) and (l is None) == (m is None)
        assert l is None or torch.equal(l, m)


def test_registry_has_every_method_and_the_paper_defaults():
    assert {"none", "mixup", "cutmix", "manifold", "moex", "catchup", *METHODS} <= set(MIXERS)
    model = HeadNet()
    assert build_mixer("saliencymix", num_classes=5).prob == 0.5 and MIXERS["saliencymix"].default_alpha == 1.0
    assert build_mixer("alignmix", model, num_classes=5).alpha == 2.0
    snapmix = build_mixer("snapmix", model, num_classes=5)
    assert (snapmix.alpha, snapmix.prob) == (1.0, 0.5)
    assert build_mixer("moex", model, num_classes=5).prob == 0.25
    assert build_mixer("catchup", model, num_classes=5).prob == 1.0
    assert build_mixer("moex", model, num_classes=5, prob=1.0).prob == 1.0    # given beats the method's default
    recursive = build_mixer("recursivemix", model, num_classes=5)
    assert recursive.alpha == 0.5 and recursive.omega == 0.5
    assert build_mixer("resizemix", num_classes=5).scale == (0.1, 0.8)


def test_hooking_and_model_reading_methods_work_on_a_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(HeadNet())
        for name in ("catchup", "snapmix", "alignmix", "recursivemix"):
            mixer = build_mixer(name, model, num_classes=5, prob=1.0, seed=0,
                                **({"layers": ["b"]} if name == "catchup" else {}))
            applied = []
            if mixer.hooks is not None:     # the stage hook found the stage inside the wrapper and mixed there
                inner = mixer.hooks.mix_fn
                mixer.hooks.mix_fn = lambda h, plan: applied.append(plan.layer) or inner(h, plan)
            for step in range(3):
                model.zero_grad()
                train_step(mixer, model, *batch(seed=step))
                assert model.module.fc.weight.grad is not None
            if name == "catchup":
                assert applied == [1, 1, 1]
            mixer.remove()
    finally:
        dist.destroy_process_group()
