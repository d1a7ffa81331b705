"""Tests for catchup.data, on small fixtures written in the published on-disk layouts."""
from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from catchup.data import (
    DATASETS, FASHION_MNIST_DEB_DIR, DataInfo, build_datasets, build_eval_transform, dataset_labels, per_class_subset,
)
from catchup.errors import CatchupError
from tests.fixtures_data import (write_cifar10, write_cifar100, write_fashion, write_image_folders,
                                  write_tinyimagenet)

def _normalized(chw_uint8, info):
    """Independent reference: (x/255 - mean) / std per channel, in float64."""
    mean = np.asarray(info.mean).reshape(-1, 1, 1)
    std = np.asarray(info.std).reshape(-1, 1, 1)
    return (chw_uint8.astype(np.float64) / 255 - mean) / std


# ---------------------------------------------------------------- per-class subsets


def _half_up(fraction, n):
    return max(1, math.floor(Fraction(str(fraction)) * n + Fraction(1, 2)))


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.25, 0.5, 0.9, 1.0])
def test_per_class_subset_counts(fraction):
    counts = {0: 25, 1: 3, 2: 1, 3: 10, 4: 7, 7: 30}
    labels = [c for c, n in counts.items() for _ in range(n)]
    np.random.default_rng(5).shuffle(labels)
    idx = per_class_subset(labels, fraction, seed=3)
    assert idx == sorted(set(idx))
    for c, n in counts.items():
        assert sum(labels[i] == c for i in idx) == _half_up(fraction, n), (c, n)


def test_per_class_subset_seeds():
    labels = [i % 4 for i in range(400)]
    assert per_class_subset(labels, 0.3, seed=1) == per_class_subset(labels, 0.3, seed=1)
    assert per_class_subset(labels, 0.3, seed=1) != per_class_subset(labels, 0.3, seed=2)
    assert per_class_subset(labels, 1.0, seed=9) == list(range(400))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_fraction_outside_range(bad):
    with pytest.raises(CatchupError, match="train_fraction"):
        per_class_subset([0, 1, 1], bad, seed=0)
    with pytest.raises(CatchupError, match="train_fraction"):
        build_datasets("digits", None, train_fraction=bad)


# ---------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test, info = build_datasets("digits", None, train_transform=False)
    assert (len(train), len(test)) == (1437, 360)
    assert info == DataInfo(10, 1, 8, info.mean, info.std, "digits")
    # the two splits partition the 1797 images (as multisets of image bytes + label)
    def keys(ds):
        return sorted(ds.images[i].numpy().tobytes() + bytes([ds.targets[i]]) for i in range(len(ds)))
    everything = sorted(d.images[i].astype(np.uint8).tobytes() + bytes([int(d.target[i])]) for i in range(1797))
    assert sorted(keys(train) + keys(test)) == everything
    per_class = np.bincount(d.target)
    test_counts = np.bincount(test.targets, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1)
    # the split does not move with the seed (only the train subset does)
    for seed in (0, 7):
        tr, te, _ = build_datasets("digits", None, seed=seed, train_fraction=0.5)
        assert torch.equal(te.images, test.images) and te.targets == test.targets
        assert set(dataset_labels(tr)) == set(range(10)) and isinstance(tr, Subset)
    a = build_datasets("digits", None, seed=0, train_fraction=0.5)[0].indices
    b = build_datasets("digits", None, seed=7, train_fraction=0.5)[0].indices
    assert a != b and len(a) == len(b)


def test_digits_normalization():
    train, test, info = build_datasets("digits", None, train_transform=False)
    x = torch.stack([train[i][0] for i in range(len(train))]).double()
    assert x.shape == (1437, 1, 8, 8) and train[0][0].dtype == torch.float32
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-5
    raw = x * info.std[0] + info.mean[0]  # back to [0,1]: must be the original 0..16 values / 16
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-4) and raw.min() > -1e-6 and raw.max() < 1 + 1e-6
    xt = torch.stack([test[i][0] for i in range(len(test))])
    assert abs(xt.mean().item()) < 0.1
    assert isinstance(test[0][1], int)


def test_digits_train_augmentation_is_shift_without_flip():
    train, _, info = build_datasets("digits", None)
    plain, _, _ = build_datasets("digits", None, train_transform=False)
    zero = -info.mean[0] / info.std[0]  # a padded pixel: 0 in pixel space, then normalized
    ref = np.pad(plain[5][0][0].numpy(), 1, constant_values=zero)
    shifts = {(i, j): ref[i:i + 8, j:j + 8] for i in range(3) for j in range(3)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        out = train[5][0][0].numpy()
        match = [k for k, v in shifts.items() if np.allclose(out, v, atol=1e-5)]
        assert match, "a train item must be the eval item shifted by at most one pixel"
        seen.update(match)
    assert seen == set(shifts)
    x, y = next(iter(DataLoader(train, batch_size=16, shuffle=True)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


# ---------------------------------------------------------------- CIFAR


def test_cifar10_published_layout(tmp_path):
    rows, labels = write_cifar10(tmp_path)
    train, test, info = build_datasets("cifar10", str(tmp_path), train_transform=False)
    assert info.family == "cifar" and info.num_classes == 10 and info.input_size == 32
    assert len(train) == 20 and len(test) == 6
    assert dataset_labels(train) == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    # item 6 = data_batch_2 row 2; channel c, pixel (h, w) sits at column c*1024 + h*32 + w of the row
    row = rows["data_batch_2"][2]
    chw = np.array([[[row[c * 1024 + h * 32 + w] for w in range(32)] for h in range(32)] for c in range(3)])
    x, y = train[6]
    assert y == labels["data_batch_2"][2] and x.shape == (3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), _normalized(chw, info), atol=1e-5)
    # the eval transform on a PIL image of the same picture gives the same tensor
    pil = Image.fromarray(chw.transpose(1, 2, 0).astype(np.uint8))
    np.testing.assert_allclose(build_eval_transform(info)(pil).numpy(), x.numpy(), atol=1e-6)
    # data_dir may also name the cifar-10-batches-py folder itself
    assert len(build_datasets("cifar10", str(tmp_path / "cifar-10-batches-py"))[1]) == 6


def test_cifar_train_augmentation(tmp_path):
    write_cifar10(tmp_path)
    train, _, info = build_datasets("cifar10", str(tmp_path))
    plain, _, _ = build_datasets("cifar10", str(tmp_path), train_transform=False)
    ref = plain[3][0].numpy()
    zero = (-np.asarray(info.mean) / np.asarray(info.std)).reshape(3, 1, 1)
    padded = np.broadcast_to(zero, (3, 40, 40)).copy()
    padded[:, 4:36, 4:36] = ref
    torch.manual_seed(1)
    flips = 0
    for _ in range(200):
        out = train[3][0].numpy()
        found = [(f, i, j) for f in (0, 1) for i in range(9) for j in range(9)
                 if np.allclose(out, (padded[:, :, ::-1] if f else padded)[:, i:i + 32, j:j + 32], atol=1e-5)]
        assert found, "a train item must be a padded crop, possibly mirrored"
        flips += found[0][0]
    assert 60 < flips < 140


def test_cifar100_published_layout_and_subset(tmp_path):
    data = write_cifar100(tmp_path)
    train, test, info = build_datasets("cifar100", str(tmp_path), train_fraction=0.5, seed=4)
    assert info.num_classes == 100 and info.mean == (0.5071, 0.4865, 0.4409)
    fine = data["train"][1]
    counts = np.bincount(fine, minlength=100)
    got = np.bincount(dataset_labels(train), minlength=100)
    assert all(got[c] == (_half_up(0.5, counts[c]) if counts[c] else 0) for c in range(100))
    assert dataset_labels(test) == data["test"][1]
    x, y = next(iter(DataLoader(train, batch_size=4, num_workers=2)))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [fine[i] for i in train.indices[:4]]


def test_cifar_errors(tmp_path):
    with pytest.raises(CatchupError, match=r"download: true.*cifar-10-batches-py"):
        build_datasets("cifar10", str(tmp_path))
    with pytest.raises(CatchupError, match="needs data_dir"):
        build_datasets("cifar100", None)
    write_cifar10(tmp_path)
    with pytest.raises(CatchupError, match="input_size must be 32"):
        build_datasets("cifar10", str(tmp_path), input_size=64)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(CatchupError, match=r"missing .*data_batch_3"):
        build_datasets("cifar10", str(tmp_path))
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CatchupError, match="cannot read"):
        build_datasets("cifar100", str(tmp_path))


# ---------------------------------------------------------------- Tiny-ImageNet and image folders


def test_tinyimagenet_layout(tmp_path):
    write_tinyimagenet(tmp_path)
    for data_dir in (tmp_path, tmp_path / "tiny-imagenet-200"):
        train, val, info = build_datasets("tinyimagenet", str(data_dir))
        assert info == DataInfo(3, 3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "tinyimagenet")
        # classes are indexed by sorted wnid: n01 -> 0, n02 -> 1, n03 -> 2
        assert dataset_labels(val) == [2, 0, 1, 0]
        assert sorted(dataset_labels(train)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(os.path.basename(p).startswith(("n01", "n02", "n03")[y]) for p, y in train.samples)
    x, y = train[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert val[0][0].shape == (3, 64, 64) and val[0][1] == 2


def test_tinyimagenet_errors(tmp_path):
    base = write_tinyimagenet(tmp_path)
    os.remove(base / "val" / "val_annotations.txt")
    with pytest.raises(CatchupError, match=r"missing .*val_annotations.txt.*tiny-imagenet-200 layout"):
        build_datasets("tinyimagenet", str(base))
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09\t0\t0\t1\t1\n")
    with pytest.raises(CatchupError, match="bad line 1"):
        build_datasets("tinyimagenet", str(base))
    with pytest.raises(CatchupError, match="missing folder"):
        build_datasets("tinyimagenet", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name,size,family", [("imagefolder", 32, "imagenet"), ("finegrained", 56, "finegrained")])
def test_image_folders(tmp_path, name, size, family):
    write_image_folders(tmp_path, classes=("b", "a", "c"))
    train, val, info = build_datasets(name, str(tmp_path), input_size=size)
    assert (info.family, info.num_classes, info.input_size) == (family, 3, size)
    assert dataset_labels(val) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(train[i][0].shape == (3, size, size) for i in range(len(train)))
    first = val[4][0]
    assert first.shape == (3, size, size) and torch.equal(first, val[4][0])  # eval is deterministic
    assert build_datasets(name, str(tmp_path))[2].input_size == 224


def test_finegrained_eval_is_resize_then_center_crop(tmp_path):
    """Resize((64,64)) + CenterCrop(56) (= the 256/224 recipe at 56): a checkerboard survives pixel-exact."""
    info = DataInfo(2, 3, 56, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "finegrained")
    board = ((np.indices((32, 32)).sum(0) // 4) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(np.stack([board] * 3, -1)).resize((64, 64), Image.NEAREST)
    out = build_eval_transform(info)(img).numpy()
    expected = _normalized(np.stack([np.asarray(img)[4:60, 4:60, 0]] * 3), info)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_image_folder_errors_and_corrupt_file(tmp_path):
    with pytest.raises(CatchupError, match=r"missing folder .*train"):
        build_datasets("imagefolder", str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(CatchupError, match="class folder"):
        build_datasets("imagefolder", str(tmp_path))
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(CatchupError, match="no valid file"):
        build_datasets("imagefolder", str(tmp_path))

    root = write_image_folders(tmp_path / "ok")
    garbage = root / "train" / "dog" / "9.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    truncated = root / "val" / "cat" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    train, val, _ = build_datasets("finegrained", str(root))
    assert dataset_labels(train).count(1) == 4  # labels need no decoding
    bad = [i for i, (p, _) in enumerate(train.samples) if p == str(garbage)][0]
    with pytest.raises(CatchupError, match=r"cannot decode image .*9\.jpg"):
        train[bad]
    with pytest.raises(CatchupError, match=r"cannot decode image .*0\.jpg"):
        val[0]


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx(tmp_path, gz):
    arrays = write_fashion(tmp_path / "fm", gz=gz)
    train, test, info = build_datasets("fashion_mnist", str(tmp_path / "fm"), train_transform=False)
    assert info == DataInfo(10, 1, 28, (0.2860,), (0.3530,), "mnist")
    assert (len(train), len(test)) == (20, 10)
    assert dataset_labels(test) == arrays["t10k-labels-idx1-ubyte"].tolist()
    x, y = test[3]
    assert x.shape == (1, 28, 28) and y == arrays["t10k-labels-idx1-ubyte"][3]
    np.testing.assert_allclose(x.numpy(), _normalized(arrays["t10k-images-idx3-ubyte"][3][None], info), atol=1e-5)
    aug, _, _ = build_datasets("fashion_mnist", str(tmp_path / "fm"))
    assert aug[0][0].shape == (1, 28, 28)


def test_fashion_mnist_bad_files(tmp_path):
    write_fashion(tmp_path / "raw")
    path = tmp_path / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CatchupError, match=r"train-images-idx3-ubyte has \d+ bytes, expected"):
        build_datasets("fashion_mnist", str(tmp_path / "raw"))
    path.write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 20)
    with pytest.raises(CatchupError, match="bad header"):
        build_datasets("fashion_mnist", str(tmp_path / "raw"))

    write_fashion(tmp_path / "gz", gz=True)
    path = tmp_path / "gz" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(CatchupError, match="cannot read .*t10k-labels"):
        build_datasets("fashion_mnist", str(tmp_path / "gz"))
    os.remove(path)
    with pytest.raises(CatchupError, match=r"missing .*t10k-labels-idx1-ubyte\[\.gz\]"):
        build_datasets("fashion_mnist", str(tmp_path / "gz"))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEB_DIR), reason="Debian package dataset-fashion-mnist absent")
def test_fashion_mnist_debian_files():
    train, test, _ = build_datasets("fashion_mnist", None)
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(dataset_labels(train)).tolist() == [6000] * 10
    assert np.bincount(dataset_labels(test)).tolist() == [1000] * 10
    assert train.images.dtype == torch.uint8
    pixels = train.images.double() / 255  # the published statistics of the train split
    assert abs(pixels.mean().item() - 0.2860) < 5e-4 and abs(pixels.std().item() - 0.3530) < 5e-4


# ---------------------------------------------------------------- names and labels


def test_names_and_unknowns():
    assert set(DATASETS) == {"cifar10", "cifar100", "tinyimagenet", "imagefolder", "finegrained",
                             "fashion_mnist", "digits", "wds/<name>", "hfds/<name>"}
    with pytest.raises(CatchupError, match="unknown dataset 'mnist'"):
        build_datasets("mnist", None)
    with pytest.raises(CatchupError, match="cannot read the labels"):
        dataset_labels(torch.utils.data.TensorDataset(torch.zeros(3, 2)))
