"""The datasets: CIFAR-10/100, Tiny-ImageNet, ImageNet-style folders, tar files and WebDataset shards,
fine-grained folders, Fashion-MNIST, digits.

Every dataset yields `(float tensor [C,H,W] normalized with DataInfo.mean/std, int label)`.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

from catchup.data.augment import Augment, check_augment, resolve_model_data
from catchup.data.readers import (TAR_LAYOUT, WDS_LAYOUT, hfds_images, tar_images, tar_source, wds_dataset,
                                  wds_num_classes)
from catchup.data.subsets import check_fraction, dataset_labels, per_class_subset
from catchup.data.transforms import FIXED_FAMILIES, DataInfo, build_eval_transform, build_train_transform
from catchup.errors import CatchupError

DATASETS: tuple[str, ...] = (
    "cifar10", "cifar100", "tinyimagenet", "imagefolder", "finegrained", "fashion_mnist", "digits", "wds/<name>",
    "hfds/<name>",
)
FASHION_MNIST_DEB_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_TINY_LAYOUT = ("expected the tiny-imagenet-200 layout: wnids.txt, train/<wnid>/images/*.JPEG, "
                "val/images/*.JPEG, val/val_annotations.txt")
_FOLDER_LAYOUT = "expected <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image>"
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST_LAYOUT = f"expected {', '.join(_MNIST_FILES)} (each optionally .gz)"


class ArrayDataset(Dataset):
    """In-memory uint8 images [N,C,H,W]; pixel values in [0, max_value] are mapped to [0,1] per item."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform: Callable, max_value: int = 255):
        self.images, self.targets, self.transform, self.max_value = images, list(targets), transform, max_value

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.max_value != 255:
            x = x.to(torch.float32).div_(self.max_value)
        return self.transform(x), self.targets[index]


def load_image(path: str) -> Image.Image:
    """PIL loader that names the file it cannot decode instead of failing somewhere inside a worker."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CatchupError(f"cannot decode image {path}: {e}") from e


class ImageList(Dataset):
    """(path, label) pairs read with `load_image`; used for Tiny-ImageNet's flat val folder."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


class _TensorItems:
    """CIFAR items as uint8 CHW tensor views (no PIL round trip) for `PadCropFlip`."""

    data: np.ndarray
    targets: list[int]
    transform: Callable

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(torch.from_numpy(self.data[index]).permute(2, 0, 1)), self.targets[index]


# torchvision checks the MD5 of every file: that ties the loader to the exact published bytes and rejects
# re-packed copies. These subclasses only drop the MD5s (check_integrity(path, None) tests existence);
# `_load_cifar` validates the content instead (shapes, label range), and unpickling catches damaged files.
# The archive MD5 (tgz_md5) is kept, so download=True still verifies what it fetches.
class Cifar10Files(_TensorItems, CIFAR10):
    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class Cifar100Files(_TensorItems, CIFAR100):
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


# ---------------------------------------------------------------- builders

def _fixed_size(name: str, family: str, input_size: int | None) -> int:
    native = FIXED_FAMILIES[family][0]
    if input_size not in (None, native):
        raise CatchupError(f"{name} images are {native}x{native}; input_size must be {native}, got {input_size}")
    return native


def _require_dir(name: str, data_dir: str | None, layout: str) -> str:
    if data_dir is None:
        raise CatchupError(f"{name} needs data_dir; {layout}")
    if not os.path.isdir(data_dir):
        raise CatchupError(f"{name}: missing folder {data_dir}; {layout}")
    return data_dir


def _load_cifar(name: str, data_dir: str | None, download: bool, input_size: int | None,
                train_transform: bool) -> tuple[Dataset, Dataset, DataInfo]:
    cls = Cifar10Files if name == "cifar10" else Cifar100Files
    hint = f"set download: true or point data_dir at the folder holding {cls.base_folder}"
    if data_dir is None:
        raise CatchupError(f"{name} needs data_dir; {hint}")
    root = data_dir.rstrip("/") or "/"
    if os.path.basename(root) == cls.base_folder:  # data_dir names the batches folder itself
        root = os.path.dirname(root)
    if not download:
        for fname in [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]:
            path = os.path.join(root, cls.base_folder, fname)
            if not os.path.isfile(path):
                raise CatchupError(f"{name}: missing {path}; {hint}")
    mean, std = _CIFAR_STATS[name]
    info = DataInfo(10 if name == "cifar10" else 100, 3, _fixed_size(name, "cifar", input_size), mean, std, "cifar")
    eval_tf = build_eval_transform(info)
    sets = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, transform=build_train_transform(info) if train and train_transform else eval_tf,
                     download=download)
        except Exception as e:  # unpickling damaged files raises many types; all mean "unreadable"
            folder = os.path.join(root, cls.base_folder)
            raise CatchupError(f"{name}: cannot read {folder}: {type(e).__name__}: {e}") from e
        labels = np.asarray(ds.targets)
        if ds.data.shape[1:] != (32, 32, 3) or len(labels) != len(ds.data) or not (
                len(labels) and 0 <= labels.min() and labels.max() < info.num_classes):
            raise CatchupError(f"{name}: unexpected content in {os.path.join(root, cls.base_folder)} "
                               f"(images {ds.data.shape}, {len(labels)} labels)")
        sets.append(ds)
    return sets[0], sets[1], info


def _image_folder(path: str, transform: Callable, layout: str) -> ImageFolder:
    if not os.path.isdir(path):
        raise CatchupError(f"missing folder {path}; {layout}")
    try:
        return ImageFolder(path, transform=transform, loader=load_image)
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise CatchupError(f"{path}: {e} {layout}") from e


def _load_tinyimagenet(name: str, data_dir: str | None, download: bool, input_size: int | None,
                       train_transform: bool) -> tuple[Dataset, Dataset, DataInfo]:
    root = _require_dir(name, data_dir, _TINY_LAYOUT)
    if os.path.isfile(os.path.join(root, "tiny-imagenet-200", "wnids.txt")):
        root = os.path.join(root, "tiny-imagenet-200")
    parts = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
    paths = {k: os.path.join(root, *k.split("/")) for k in parts}
    for path in paths.values():
        if not os.path.exists(path):
            raise CatchupError(f"{name}: missing {path}; {_TINY_LAYOUT}")
    with open(paths["wnids.txt"]) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    if not wnids:
        raise CatchupError(f"{name}: {paths['wnids.txt']} lists no classes")
    info = DataInfo(len(wnids), 3, _fixed_size(name, "tinyimagenet", input_size), IMAGENET_DEFAULT_MEAN,
                    IMAGENET_DEFAULT_STD, "tinyimagenet")
    eval_tf = build_eval_transform(info)
    train = _image_folder(paths["train"], build_train_transform(info) if train_transform else eval_tf, _TINY_LAYOUT)
    if train.classes != wnids:  # the sorted wnids index the classes, as in Tiny-ImageNet-C's folders
        extra = sorted(set(train.classes) ^ set(wnids))[:3]
        raise CatchupError(f"{name}: train/ class folders differ from wnids.txt (e.g. {extra}) in {root}")
    present = set(os.listdir(paths["val/images"]))
    samples = []
    with open(paths["val/val_annotations.txt"]) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in train.class_to_idx or fields[0] not in present:
                raise CatchupError(f"{name}: bad line {lineno} in {paths['val/val_annotations.txt']}: {line.strip()!r} "
                                   "(needs an image in val/images and a wnid from wnids.txt)")
            samples.append((os.path.join(paths["val/images"], fields[0]), train.class_to_idx[fields[1]]))
    if not samples:
        raise CatchupError(f"{name}: {paths['val/val_annotations.txt']} is empty")
    return train, ImageList(samples, eval_tf), info


def _split_set(name: str, root: str, split: str) -> Dataset:
    source = tar_source(root, split)
    if source is not None:
        return tar_images(source)
    return _image_folder(os.path.join(root, split), None, _FOLDER_LAYOUT if name == "finegrained" else TAR_LAYOUT)


def _check_size(name: str, size) -> None:
    if not isinstance(size, int) or size < 8:
        raise CatchupError(f"{name}: input_size must be an integer >= 8, got {size!r}")


def _load_image_folders(name: str, data_dir: str | None, download: bool, input_size: int | None,
                        train_transform: bool, augment: Augment) -> tuple[Dataset, Dataset, DataInfo]:
    root = _require_dir(name, data_dir, _FOLDER_LAYOUT)
    # the class count is known only after listing, so the transforms are attached once it is
    train, val = _split_set(name, root, "train"), _split_set(name, root, "val")
    if val.classes != train.classes:
        extra = sorted(set(val.classes) ^ set(train.classes))[:3]
        raise CatchupError(f"{name}: train/ and val/ class folders differ (e.g. {extra}) in {root}")
    if name == "finegrained":
        size = 224 if input_size is None else input_size
        _check_size(name, size)
        info = DataInfo(len(train.classes), 3, size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "finegrained")
    else:
        info = _imagenet_info(name, len(train.classes), input_size, augment)
    val.transform = build_eval_transform(info)
    train.transform = build_train_transform(info, augment) if train_transform else val.transform
    return train, val, info


def _imagenet_info(name: str, num_classes: int, input_size: int | None, augment: Augment) -> DataInfo:
    """Input size, crop_pct, interpolation, mean and std resolved by timm from the model (recipe keys first)."""
    check_augment(augment)
    data = resolve_model_data(augment, input_size)
    size = data["input_size"][-1]
    _check_size(name, size)
    return DataInfo(num_classes, 3, size, tuple(data["mean"]), tuple(data["std"]), "imagenet",
                    crop_pct=float(data["crop_pct"]), interpolation=str(data["interpolation"]))


def _load_hfds(name: str, data_dir: str | None, input_size: int | None, train_transform: bool, augment: Augment,
               num_classes: int | None, splits: tuple[str, str]) -> tuple[Dataset, Dataset, DataInfo]:
    train, val = hfds_images(name, data_dir, splits[0]), hfds_images(name, data_dir, splits[1])
    num_classes = num_classes or len(train.classes)
    if not num_classes:
        raise CatchupError(f"{name}: the label column names no classes; set num_classes in the recipe")
    info = _imagenet_info(name, num_classes, input_size, augment)
    val.transform = build_eval_transform(info)
    train.transform = build_train_transform(info, augment) if train_transform else val.transform
    return train, val, info


def _load_wds(name: str, data_dir: str | None, input_size: int | None, train_transform: bool, augment: Augment,
              seed: int, num_classes: int | None, splits: tuple[str, str]) -> tuple[Dataset, Dataset, DataInfo]:
    root = _require_dir(name, data_dir, WDS_LAYOUT)
    num_classes = num_classes or wds_num_classes(root)
    if not num_classes:
        raise CatchupError(f"{name}: the shards' _info.json gives no num_classes; set num_classes in the recipe")
    info = _imagenet_info(name, num_classes, input_size, augment)
    # batch_size is a placeholder here: make_loaders sets the per-process batch that fixes the epoch length
    train = wds_dataset(name, root, splits[0], True, 1, seed)
    val = wds_dataset(name, root, splits[1], False, 1, seed)
    val.transform = build_eval_transform(info)
    train.transform = build_train_transform(info, augment) if train_transform else val.transform
    return train, val, info


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an IDX file (MNIST format: 4-byte magic 0,0,8,ndim; big-endian uint32 dims; uint8 data).

    By hand because torchvision's FashionMNIST insists on its own folder layout and file MD5s.
    """
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            buf = f.read()
    except (OSError, EOFError) as e:  # EOFError: truncated gzip stream
        raise CatchupError(f"cannot read {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(buf) < header or buf[:4] != bytes((0, 0, 8, ndim)):
        raise CatchupError(f"{path} is not an IDX file of uint8 with {ndim} dimension(s) (bad header)")
    dims = np.frombuffer(buf, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected = header + int(np.prod(dims))
    if len(buf) != expected:
        raise CatchupError(f"{path} has {len(buf)} bytes, expected {expected} for shape {tuple(dims)} (truncated?)")
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(root: str, stem: str) -> str:
    for path in (os.path.join(root, stem), os.path.join(root, stem + ".gz")):
        if os.path.isfile(path):
            return path
    raise CatchupError(f"fashion_mnist: missing {os.path.join(root, stem)}[.gz]; {_MNIST_LAYOUT}")


def _load_fashion_mnist(name: str, data_dir: str | None, download: bool, input_size: int | None,
                        train_transform: bool) -> tuple[Dataset, Dataset, DataInfo]:
    if data_dir is None and os.path.isdir(FASHION_MNIST_DEB_DIR):
        data_dir = FASHION_MNIST_DEB_DIR
    root = _require_dir(name, data_dir, f"{_MNIST_LAYOUT}, or apt-get install dataset-fashion-mnist")
    info = DataInfo(10, 1, _fixed_size(name, "mnist", input_size), (0.2860,), (0.3530,), "mnist")
    eval_tf = build_eval_transform(info)
    sets = []
    for split, tf in (("train", build_train_transform(info) if train_transform else eval_tf), ("t10k", eval_tf)):
        images = _read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"), 3)
        labels = _read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"), 1)
        if images.shape[1:] != (28, 28) or len(labels) != len(images) or (len(labels) and labels.max() > 9):
            raise CatchupError(f"fashion_mnist: {split} files in {root} disagree: images {images.shape}, "
                               f"{len(labels)} labels (max {labels.max() if len(labels) else None})")
        sets.append(ArrayDataset(torch.from_numpy(images)[:, None], labels.tolist(), tf))
    return sets[0], sets[1], info


def _load_digits(name: str, data_dir: str | None, download: bool, input_size: int | None,
                 train_transform: bool) -> tuple[Dataset, Dataset, DataInfo]:
    """scikit-learn's embedded 8x8 digits (values 0..16); no data_dir. The 80/20 split is fixed (seed 0)
    whatever the run's seed, so test accuracies are comparable across runs."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    train_pixels = images[train_idx] / 16.0
    info = DataInfo(10, 1, _fixed_size(name, "digits", input_size), (float(train_pixels.mean()),),
                    (float(train_pixels.std()),), "digits")
    eval_tf = build_eval_transform(info)
    tensors = torch.from_numpy(images)[:, None]
    train = ArrayDataset(tensors[train_idx], labels[train_idx].tolist(),
                         build_train_transform(info) if train_transform else eval_tf, max_value=16)
    return train, ArrayDataset(tensors[test_idx], labels[test_idx].tolist(), eval_tf, max_value=16), info


_BUILDERS = {
    "cifar10": _load_cifar, "cifar100": _load_cifar, "tinyimagenet": _load_tinyimagenet,
    "imagefolder": _load_image_folders, "finegrained": _load_image_folders,
    "fashion_mnist": _load_fashion_mnist, "digits": _load_digits,
}


def build_datasets(name: str, data_dir: str | None, *, train_fraction: float = 1.0, seed: int = 0,
                   download: bool = False, input_size: int | None = None, train_transform: bool = True,
                   augment: Augment | None = None, num_classes: int | None = None,
                   splits: tuple[str, str] = ("train", "validation")) -> tuple[Dataset, Dataset, DataInfo]:
    """(train_set, eval_set, info). `train_fraction` keeps that share of every class of the train set
    (chosen with `seed`); `train_transform=False` puts the eval transform on the train set too.

    `augment` (timm train.py's augmentation options and the model name) drives the ImageNet-style datasets;
    set on any other dataset, its keys are refused. `num_classes` and `splits` (train, eval) are read by
    Hugging Face datasets (`hfds/<name>`) and WebDataset shards (`wds/<name>`, iterable: no per-class subsets).
    """
    augment = augment or Augment()
    check_fraction(train_fraction)
    if name.lower().startswith("hfds/"):
        train, eval_set, info = _load_hfds(name, data_dir, input_size, train_transform, augment, num_classes, splits)
        if train_fraction < 1:
            train = Subset(train, per_class_subset(dataset_labels(train), train_fraction, seed))
        return train, eval_set, info
    if name.lower().startswith("wds/"):
        if train_fraction < 1:
            raise CatchupError(f"{name}: train_fraction needs random access; WebDataset shards are read in order")
        return _load_wds(name, data_dir, input_size, train_transform, augment, seed, num_classes, splits)
    if name not in _BUILDERS:
        raise CatchupError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name != "imagefolder" and augment.changed():
        key = augment.changed()[0]
        raise CatchupError(f"recipe key {key!r} applies to ImageNet-style data (imagefolder, hfds/, wds/); "
                           f"{name} has its own fixed augmentation")
    builder = _BUILDERS[name]
    if builder is _load_image_folders:
        train, eval_set, info = builder(name, data_dir, download, input_size, train_transform, augment)
    else:
        train, eval_set, info = builder(name, data_dir, download, input_size, train_transform)
    if train_fraction < 1:
        train = Subset(train, per_class_subset(dataset_labels(train), train_fraction, seed))
    return train, eval_set, info
