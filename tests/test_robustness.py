"""Robustness metrics checked against independent computations (loops, hand examples, scipy)."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from catchup.errors import CatchupError
from catchup.robustness import (
    CIFAR_CORRUPTIONS_15,
    CORRUPTIONS_ALL,
    DEFORMATIONS,
    CifarCorrupted,
    TinyImageNetCorrupted,
    available_corruptions,
    classification_metrics,
    corruption_summary,
    deform_batch,
    evaluate_logits,
    expected_calibration_error,
    feature_drop_curve,
    feature_mass_share,
    fgsm_error,
    fgsm_perturb,
    max_softmax_score,
    ood_metrics,
    plot_corruption_heatmap,
    plot_deformations,
    plot_reliability,
    plot_reliance_curves,
    pooled_features,
    read_class_indices,
    restrict_logits,
    warp_batch,
)
from catchup.robustness.deformations import rotation_matrices, sample_matrices, shear_matrices, zoom_matrices

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
MEAN_T = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
STD_T = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)


# ---------------------------------------------------------------- clean metrics

def test_ece_by_hand():
    conf = torch.tensor([0.95, 0.92, 0.70, 0.68, 0.30], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 1, 0])
    # 15 bins of width 1/15: 0.95 -> (14/15, 1]; 0.92 -> (13/15, 14/15]; 0.70, 0.68 -> (10/15, 11/15];
    # 0.30 -> (4/15, 5/15]
    expected = (abs(1 - 0.95) + abs(0 - 0.92) + 2 * abs(1 - 0.69) + abs(0 - 0.30)) / 5 * 100
    assert expected_calibration_error(conf, correct) == pytest.approx(expected, abs=1e-9)


def test_ece_bins_are_right_closed():
    # 4 bins: 0.5 falls in (0.25, 0.5] together with 0.3, not in (0.5, 0.75] with 0.6
    conf = torch.tensor([0.3, 0.5, 0.6], dtype=torch.float64)
    correct = torch.tensor([0, 0, 1])
    expected = (abs(0 - 0.4) * 2 + abs(1 - 0.6)) / 3 * 100
    assert expected_calibration_error(conf, correct, n_bins=4) == pytest.approx(expected, abs=1e-9)


def test_classification_metrics_against_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g)
    targets = torch.randint(0, 10, (200,), generator=g)
    m = classification_metrics(logits, targets)
    top1 = top5 = nll = 0.0
    confs, hits = [], []
    for row, t in zip(logits.tolist(), targets.tolist()):
        order = sorted(range(10), key=lambda k: -row[k])
        top1 += order[0] == t
        top5 += t in order[:5]
        z = sum(math.exp(v) for v in row)
        nll += -math.log(math.exp(row[t]) / z)
        confs.append(math.exp(row[order[0]]) / z)
        hits.append(order[0] == t)
    assert m.n == 200
    assert m.top1 == pytest.approx(top1 / 2)
    assert m.top5 == pytest.approx(top5 / 2)
    assert m.nll == pytest.approx(nll / 200, rel=1e-5)
    ece = 0.0
    for b in range(15):
        idx = [i for i, c in enumerate(confs) if b / 15 < c <= (b + 1) / 15]
        if idx:
            acc = sum(hits[i] for i in idx) / len(idx)
            ece += len(idx) / 200 * abs(acc - sum(confs[i] for i in idx) / len(idx))
    assert m.ece == pytest.approx(ece * 100, abs=1e-4)


def _tiny_net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes))
    with torch.no_grad():  # non-trivial running statistics so eval-mode batchnorm matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def test_evaluate_logits_matches_direct_forward_and_hooks():
    net = _tiny_net().train()
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 4, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    gathered = []

    def gather(t):
        gathered.append(t.shape[0])
        return t

    logits, targets = evaluate_logits(net, loader, "cpu", transform_batch=lambda xb, yb: -xb, gather=gather)
    assert net.training  # flag restored
    net.eval()
    with torch.no_grad():
        expected = net(-x)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.equal(targets, y)
    assert gathered == [4, 4, 4, 4, 2, 2]  # logits and targets of each batch


# ---------------------------------------------------------------- FGSM

def _fgsm_loop(net, x, y, eps):
    mean, std = MEAN_T, STD_T
    out = []
    for i in range(x.shape[0]):
        x01 = (x[i:i + 1] * std + mean).clone().requires_grad_(True)
        loss = F.cross_entropy(net((x01 - mean) / std), y[i:i + 1])
        (g,) = torch.autograd.grad(loss, x01)
        out.append(((x01.detach() + eps * g.sign()).clamp(0, 1) - mean) / std)
    return torch.cat(out)


def test_fgsm_matches_per_sample_loop_and_bounds():
    net = _tiny_net().double().train()
    stats = net[1].running_mean.clone()
    g = torch.Generator().manual_seed(1)
    x01 = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    x01[0, :, :2] = 0.0  # pixels at the box edges must stay inside [0, 1]
    x01[1, :, :2] = 1.0
    x = (x01 - MEAN_T) / STD_T
    y = torch.randint(0, 4, (6,), generator=g)
    eps = 4 / 255
    adv = fgsm_perturb(net, x, y, eps, MEAN, STD)
    assert net.training and torch.equal(net[1].running_mean, stats)  # eval during the attack, flag restored
    assert all(p.grad is None for p in net.parameters())
    net.eval()
    expected = _fgsm_loop(net, x, y, eps)
    assert torch.allclose(adv, expected, atol=1e-12)
    adv01 = adv * STD_T + MEAN_T
    assert adv01.min() >= -1e-12 and adv01.max() <= 1 + 1e-12
    assert (adv01 - x01).abs().max() <= eps + 1e-12
    assert (adv01 - x01).abs().max() >= eps - 1e-12  # it actually moved


def test_fgsm_error_counts_every_image():
    net = _tiny_net().double()
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(9, 3, 8, 8, generator=g, dtype=torch.float64) - MEAN_T) / STD_T  # valid [0, 1] images
    y = torch.randint(0, 4, (9,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    result = fgsm_error(net, loader, mean=MEAN, std=STD, device="cpu", eps_list=(0.0, 0.25), gather=lambda t: t)
    net.eval()
    x_adv = _fgsm_loop(net, x, y, 0.25)
    with torch.no_grad():
        clean_err = 100 - 100 * (net(x).argmax(1) == y).double().mean().item()
        adv_err = 100 - 100 * (net(x_adv).argmax(1) == y).double().mean().item()
    assert adv_err > clean_err
    assert set(result) == {0.0, 0.25}
    assert result[0.0] == pytest.approx(clean_err)
    assert result[0.25] == pytest.approx(adv_err)


# ---------------------------------------------------------------- deformations

def _asymmetric(h=6, w=6, c=2):
    return torch.arange(c * h * w, dtype=torch.float32).view(1, c, h, w) + 1.0


def test_rotation_by_90_degrees_equals_rot90():
    x = _asymmetric(6, 6)
    plus = warp_batch(x, rotation_matrices(torch.tensor([90.0])))
    minus = warp_batch(x, rotation_matrices(torch.tensor([-90.0])))
    assert torch.equal(plus, torch.rot90(x, k=-1, dims=(2, 3)))
    assert torch.equal(minus, torch.rot90(x, k=1, dims=(2, 3)))


def test_zoom_identity_and_doubling():
    x = _asymmetric(7, 9)
    assert torch.equal(warp_batch(x, zoom_matrices(1.0, 1)), x)
    pattern = torch.zeros(1, 1, 16, 16)
    pattern[..., 6:10, 6:10] = 1.0  # 4x4 square centred on (7.5, 7.5)
    zoomed = warp_batch(pattern, zoom_matrices(0.5, 1))
    rows = zoomed[0, 0].sum(1).nonzero().flatten()
    cols = zoomed[0, 0].sum(0).nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (4, 11)  # 8 pixels: doubled, still centred
    assert (cols.min().item(), cols.max().item()) == (4, 11)
    assert zoomed.sum() == 64
    out = warp_batch(pattern, zoom_matrices(2.0, 1))  # zoom out halves it
    assert out.sum() == 4


def _hand_warp(img, m):
    """Output (r, c) reads input centre + M (offset); nearest; outside -> 0."""
    h, w = img.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    out = np.zeros_like(img)
    for r in range(h):
        for c in range(w):
            rin = cy + m[0][0] * (r - cy) + m[0][1] * (c - cx)
            cin = cx + m[1][0] * (r - cy) + m[1][1] * (c - cx)
            for v in (rin, cin):  # the chosen angle keeps clear of rounding ties
                assert abs(v - math.floor(v) - 0.5) > 1e-6
            ri, ci = round(rin), round(cin)
            if 0 <= ri < h and 0 <= ci < w:
                out[r, c] = img[ri, ci]
    return out


def test_shear_matches_hand_mapping():
    s = 0.7
    img = np.arange(1, 5 * 7 + 1, dtype=np.float32).reshape(5, 7)
    m = [[1.0, -math.sin(s)], [0.0, math.cos(s)]]
    got = warp_batch(torch.from_numpy(img)[None, None], shear_matrices(torch.tensor([s])))[0, 0].numpy()
    expected = _hand_warp(img, m)
    assert np.array_equal(got, expected)
    assert (got == 0).any()  # fill outside the input is 0 (the image holds no zeros)


@pytest.mark.parametrize("matrix", [rotation_matrices(torch.tensor([33.0])), zoom_matrices(0.6, 1),
                                    zoom_matrices(1.4, 1), shear_matrices(torch.tensor([-1.0]))])
def test_warp_matches_scipy_nearest(matrix):
    img = np.random.default_rng(0).uniform(1, 2, size=(9, 11))
    m = matrix[0].numpy()
    centre = np.array([4.0, 5.0])
    expected = ndi.affine_transform(img, m, offset=centre - m @ centre, order=0, mode="grid-constant", cval=0.0)
    got = warp_batch(torch.from_numpy(img)[None, None], matrix)[0, 0].numpy()
    assert np.array_equal(got, expected)


def test_keras_centre_rotation_matches_a_hand_example():
    # torchsample turns about size/2 + 0.5 = (2.5, 2.5) on a 4x4 image: output (r, c) reads input
    # (2.5 - (c - 2.5), 2.5 + (r - 2.5)) = (5 - c, r), so a quarter turn also shifts the image two columns right
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    expected = torch.tensor([[0.0, 0.0, 13.0, 9.0],
                             [0.0, 0.0, 14.0, 10.0],
                             [0.0, 0.0, 15.0, 11.0],
                             [0.0, 0.0, 16.0, 12.0]])
    assert torch.equal(warp_batch(x, rotation_matrices(torch.tensor([90.0])), centre="keras")[0, 0], expected)
    assert torch.equal(warp_batch(x, rotation_matrices(torch.tensor([90.0])), centre="true"),
                       torch.rot90(x, k=-1, dims=(2, 3)))
    with pytest.raises(CatchupError, match="centre"):
        warp_batch(x, rotation_matrices(torch.tensor([90.0])), centre="middle")


@pytest.mark.parametrize("matrix", [rotation_matrices(torch.tensor([33.0])), zoom_matrices(1.4, 1),
                                    shear_matrices(torch.tensor([-1.0]))])
def test_keras_centre_matches_scipy_about_size_over_2_plus_half(matrix):
    img = np.random.default_rng(1).uniform(1, 2, size=(9, 11))
    m = matrix[0].numpy()
    centre = np.array([9 / 2 + 0.5, 11 / 2 + 0.5])
    expected = ndi.affine_transform(img, m, offset=centre - m @ centre, order=0, mode="grid-constant", cval=0.0)
    got = warp_batch(torch.from_numpy(img)[None, None], matrix, centre="keras")[0, 0].numpy()
    assert np.array_equal(got, expected)


def test_deform_batch_seeded_and_bounded():
    x = torch.randn(5, 3, 12, 12)
    for name in DEFORMATIONS:
        a = deform_batch(x, name, torch.Generator().manual_seed(3))
        b = deform_batch(x, name, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(deform_batch(x, "rotate_40", torch.Generator().manual_seed(3)),
                           deform_batch(x, "rotate_40", torch.Generator().manual_seed(4)))
    assert list(DEFORMATIONS) == ["rotate_20", "rotate_40", "shear_28.6", "shear_57.2",
                                  "zoom_60", "zoom_80", "zoom_120", "zoom_140"]
    assert math.degrees(DEFORMATIONS["shear_28.6"].magnitude) == pytest.approx(28.65, abs=0.01)
    with pytest.raises(CatchupError):
        deform_batch(x, "rotate_90")


def test_deform_rotation_angles_within_bound():
    mats = sample_matrices(DEFORMATIONS["rotate_20"], 500, torch.Generator().manual_seed(0))
    angles = torch.rad2deg(torch.atan2(mats[:, 1, 0], mats[:, 0, 0]))
    assert angles.abs().max() <= 20 and angles.min() < -15 and angles.max() > 15


# ---------------------------------------------------------------- corruptions

def _cifar_c(root, per_severity=3, names=("fog", "snow"), size=32):
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(per_severity, dtype=np.uint8), 5)
    np.save(root / "labels.npy", labels)
    for k, name in enumerate(names):
        data = np.zeros((5 * per_severity, size, size, 3), dtype=np.uint8)
        for row in range(5 * per_severity):
            data[row] = k * 100 + row  # each row identifiable by its value
        np.save(root / f"{name}.npy", data)
    return root


def test_cifar_corrupted_rows_and_labels(tmp_path):
    root = _cifar_c(tmp_path / "C")
    ds = CifarCorrupted(root, "snow", 4, transform=np.asarray)
    assert len(ds) == 3
    image, label = ds[2]
    assert image.shape == (32, 32, 3) and int(image[0, 0, 0]) == 100 + 3 * 3 + 2 and label == 2
    assert available_corruptions(root) == ["snow", "fog"]  # canonical order
    ds[0]
    assert pickle.loads(pickle.dumps(ds))._data is None  # the memmap is not shipped to workers


def test_cifar_corrupted_errors(tmp_path):
    root = _cifar_c(tmp_path / "C")
    with pytest.raises(CatchupError, match="does not exist"):
        CifarCorrupted(tmp_path / "nope", "fog", 1)
    with pytest.raises(CatchupError, match="not found"):
        CifarCorrupted(root, "frost", 1)
    with pytest.raises(CatchupError, match="severity"):
        CifarCorrupted(root, "fog", 6)
    with pytest.raises(CatchupError, match="expects 64x64"):
        CifarCorrupted(root, "fog", 1, image_size=64)
    np.save(root / "fog.npy", np.zeros((15, 32, 32, 3), dtype=np.float32))
    with pytest.raises(CatchupError, match="uint8"):
        CifarCorrupted(root, "fog", 1)
    np.save(root / "fog.npy", np.zeros((10, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(CatchupError, match="10 images but labels.npy has 15"):
        CifarCorrupted(root, "fog", 1)
    (root / "labels.npy").unlink()
    with pytest.raises(CatchupError, match="labels"):
        CifarCorrupted(root, "snow", 1)


def _tiny_c(root, wnids=("n01443537", "n01629819"), size=64):
    for sev in (1, 2):
        for k, wnid in enumerate(wnids):
            folder = root / "fog" / str(sev) / wnid
            folder.mkdir(parents=True)
            for j in range(2):
                Image.new("RGB", (size, size), (10 * k, 50 * sev, j)).save(folder / f"img_{j}.JPEG")
    return root


def test_tiny_imagenet_corrupted(tmp_path):
    root = _tiny_c(tmp_path / "TC")
    class_to_idx = {"n01443537": 5, "n01629819": 7}
    ds = TinyImageNetCorrupted(root, "fog", 2, None, class_to_idx)
    assert len(ds) == 4
    assert sorted(label for _, label in ds) == [5, 5, 7, 7]
    assert ds[0][0].size == (64, 64)
    assert available_corruptions(root) == ["fog"]
    with pytest.raises(CatchupError, match="missing"):
        TinyImageNetCorrupted(root, "fog", 1, None, {**class_to_idx, "n09999999": 9})
    with pytest.raises(CatchupError, match="not found"):
        TinyImageNetCorrupted(root, "fog", 3, None, class_to_idx)
    with pytest.raises(CatchupError, match="expects 32x32"):
        TinyImageNetCorrupted(root, "fog", 1, None, class_to_idx, image_size=32)


def test_corruption_summary_means():
    errors = {(c, s): float(i * 5 + s) for i, c in enumerate(CORRUPTIONS_ALL) for s in range(1, 6)}
    out = corruption_summary(errors)
    assert out["per_corruption"]["gaussian_noise"] == pytest.approx(3.0)  # (1+2+3+4+5)/5
    assert out["mce_15"] == pytest.approx(np.mean([i * 5 + s for i in range(15) for s in range(1, 6)]))
    assert out["mce_all"] == pytest.approx(np.mean([i * 5 + s for i in range(19) for s in range(1, 6)]))
    assert out["per_severity"][1] == pytest.approx(np.mean([i * 5 + 1 for i in range(19)]))
    partial = corruption_summary({k: v for k, v in errors.items() if k[0] != CIFAR_CORRUPTIONS_15[3]})
    assert partial["mce_15"] is None and len(partial["corruptions"]) == 18


# ---------------------------------------------------------------- OOD

def test_ood_metrics_hand_example():
    scores_out = np.arange(1, 21, dtype=float)  # 20 OOD samples
    scores_in = np.array([0.5, 1.5, 2.0, 2.5, 10.0])
    m = ood_metrics(scores_in, scores_out)
    # 95 % of 20 = 19 OOD samples caught -> threshold 2 (score >= 2); in-dist flagged: 2.0, 2.5, 10.0
    assert m["fpr95"] == pytest.approx(60.0)
    pairs = sum((o > i) + 0.5 * (o == i) for o in scores_out for i in scores_in)
    assert m["auroc"] == pytest.approx(100 * pairs / 100)
    # average precision: sum over distinct thresholds of (recall gain) x precision, ties flagged together
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores_out) | set(scores_in), reverse=True):
        tp, fp = (scores_out >= t).sum(), (scores_in >= t).sum()
        ap += (tp / 20 - prev_recall) * tp / (tp + fp)
        prev_recall = tp / 20
    assert m["aupr"] == pytest.approx(100 * ap)
    # the other convention: in-distribution positive; AUROC is symmetric
    other = ood_metrics(scores_in, scores_out, ood_positive=False)
    assert other["auroc"] == pytest.approx(m["auroc"])
    # 95 % of 5 in-dist -> all 5 caught at -score >= -10; OOD accepted as in-dist: 1..10 -> 10 of 20
    assert other["fpr95"] == pytest.approx(50.0)


def test_fpr95_against_threshold_loop():
    rng = np.random.default_rng(0)
    s_in = np.round(rng.normal(0, 1, 300), 1)  # rounding creates ties
    s_out = np.round(rng.normal(1, 1, 137), 1)
    best = None
    for t in sorted(set(s_in) | set(s_out), reverse=True):
        if (s_out >= t).mean() >= 0.95:
            best = (s_in >= t).mean() * 100
            break
    assert ood_metrics(s_in, s_out)["fpr95"] == pytest.approx(best)


def test_msp_score_and_class_restriction(tmp_path):
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    score = max_softmax_score(logits)
    assert score[0] == pytest.approx(-math.exp(2) / (math.exp(2) + 2))
    assert score[1] == pytest.approx(-1 / 3)
    assert torch.equal(restrict_logits(logits, [2, 0]), logits[:, [2, 0]])
    listing = tmp_path / "README.txt"
    listing.write_text("There are 200 classes we consider.\n\nn01443537 goldfish\nn01704323 triceratops\n")
    assert read_class_indices(listing, {"n01443537": 1, "n01704323": 51}) == [1, 51]
    with pytest.raises(CatchupError, match="class_to_idx"):
        read_class_indices(listing)
    with pytest.raises(CatchupError):
        restrict_logits(logits, [3])


# ---------------------------------------------------------------- filter reliance

def test_feature_drop_curve_hand_example():
    features = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 1.0]])
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))  # prediction = index of the largest remaining feature
    targets = torch.tensor([0, 2])
    # largest first: n=0 -> preds (0, 1): 50 %; n=1 -> (2, 2): 50 %; n=2 -> (1, 0): 0 %
    assert feature_drop_curve(features, head, targets, [0, 1, 2]) == [(0, 50.0), (1, 50.0), (2, 0.0)]
    # smallest first: n=1 -> (0, 1): 50 %; n=2 -> (0, 1): 50 %
    assert feature_drop_curve(features, head, targets, [1, 2], order="smallest") == [(1, 50.0), (2, 50.0)]


def test_feature_mass_share_hand_example():
    features = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = feature_mass_share(features, q=(0.5, 0.9))
    # sample 1: 50 % of 10 needs {4, 3} (2/4), 90 % needs {4, 3, 2} (3/4); sample 2: one feature (1/4)
    assert out[0.5] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out[0.9] == pytest.approx((3 / 4 + 1 / 4) / 2)


def test_pooled_features_reproduce_logits():
    import timm
    model = timm.create_model("resnet10t", num_classes=5, pretrained=False)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    feats, targets = pooled_features(model, DataLoader(TensorDataset(x, y), batch_size=2), "cpu")
    with torch.no_grad():
        logits = model.eval()(x)
    assert torch.allclose(model.get_classifier()(feats), logits, atol=1e-5)
    assert torch.equal(targets, y)
    assert feats.min() >= 0  # post-ReLU pooled activations


# ---------------------------------------------------------------- plots

def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    errors = {(c, s): 10.0 + s for c in CORRUPTIONS_ALL[:4] for s in range(1, 6)}
    assert _is_png(plot_corruption_heatmap(errors, tmp_path / "a" / "heat.png"))
    curves = {"baseline": [(0, 70.0), (10, 40.0)], "catchup": [(0, 72.0), (10, 60.0)]}
    assert _is_png(plot_reliance_curves(curves, tmp_path / "rel.png"))
    results = {"baseline": {"rotate_20": 50.0, "zoom_60": 20.0}, "catchup": {"rotate_20": 55.0, "zoom_60": 25.0}}
    assert _is_png(plot_deformations(results, tmp_path / "def.png"))
    conf = torch.rand(100, generator=torch.Generator().manual_seed(0))
    assert _is_png(plot_reliability(conf, conf > 0.5, tmp_path / "cal.png"))
