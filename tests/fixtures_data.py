"""Small datasets written in the published on-disk layouts (CIFAR pickles, Tiny-ImageNet and image folders,
Fashion-MNIST idx files), for the tests of several modules."""
from __future__ import annotations

import gzip
import pickle

import numpy as np
from PIL import Image


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the published files are Python-2 pickles


def write_cifar10(root, per_batch=4, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        # published rows: 1024 red, then 1024 green, then 1024 blue values, each plane row-major
        rows[name], labels[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        _pickle(folder / name, {"batch_label": f"{name} of 5", "labels": labels[name], "data": rows[name],
                                "filenames": [f"img_{i}.png" for i in range(n)]})
    _pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "num_vis": 3072,
                                      "label_names": [f"class{i}" for i in range(10)]})
    return rows, labels


def write_cifar100(root, n_train=30, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        out[name] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), fine)
        _pickle(folder / name, {"filenames": [f"f{i}.png" for i in range(n)], "batch_label": name,
                                "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": out[name][0]})
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return out


def _jpeg(path, size, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=90)


def write_tinyimagenet(root, wnids=("n02", "n01", "n03"), per_class=3, val_labels=("n03", "n01", "n02", "n01")):
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")  # the published file is not sorted either
    for k, wnid in enumerate(wnids):
        (base / "train" / wnid / "images").mkdir(parents=True)
        boxes = []
        for i in range(per_class):
            _jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (64, 64), 10 * k + i)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for i, wnid in enumerate(val_labels):
        _jpeg(base / "val" / "images" / f"val_{i}.JPEG", (64, 64), 100 + i)
        lines.append(f"val_{i}.JPEG\t{wnid}\t1\t2\t50\t60")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_image_folders(root, classes=("cat", "dog"), per_class=3):
    for split in ("train", "val"):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                _jpeg(root / split / cls / f"{i}.jpg", (40 + 7 * i, 50 + 3 * k), 7 * k + i)
    return root


def _idx_bytes(arr):
    header = bytes((0, 0, 8, arr.ndim)) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def write_fashion(root, n_train=20, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            with gzip.open(root / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (root / name).write_bytes(data)
    return arrays
