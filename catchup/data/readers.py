"""ImageNet-style data through timm's readers: tar files and Hugging Face datasets (map-style), WebDataset
shards (iterable).

Tar files: `<data_dir>/train.tar` and `<data_dir>/val.tar` (class folders inside, or one tar per class inside), or
`<data_dir>/train/` and `<data_dir>/val/` folders holding one `<class>.tar` each (ImageNet's own distribution).
Hugging Face datasets: `dataset: hfds/<hub name or local folder>` (an `image` and a ClassLabel `label` column),
`data_dir` the datasets cache (optional).
WebDataset: `dataset: wds/<name>`, `data_dir` holding the shards and timm's `_info.json` (split names, shard
files, sample counts), or a split written as timm's shard pattern `name-train-{0000..0099}.tar|<samples>`.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Callable

from PIL import Image
from torch.utils.data import Dataset

from catchup.errors import CatchupError

TAR_LAYOUT = ("expected <data_dir>/train.tar and val.tar, or train/ and val/ folders of <class>.tar files, "
              "or train/<class>/<image> folders")
WDS_LAYOUT = "expected data_dir with the shards and timm's _info.json, or a split like 'name-train-{0000..0009}.tar|N'"


def tar_source(data_dir: str, split: str) -> str | None:
    """The tar file or folder of tar files holding `split`, or None when the split is a plain folder tree."""
    single = os.path.join(data_dir, split + ".tar")
    if os.path.isfile(single):
        return single
    folder = os.path.join(data_dir, split)
    if os.path.isdir(folder) and glob.glob(os.path.join(folder, "*.tar")):
        return folder
    return None


class ReaderImages(Dataset):
    """Images and labels from a timm map-style reader (tar files, Hugging Face datasets), decoded here.

    timm's ImageDataset replaces an image it cannot decode by the next one with a warning; that would hide a
    damaged archive and change the sample order exact resume relies on, so decoding errors name the sample.
    """

    def __init__(self, reader, source: str, transform: Callable | None = None):
        self.reader, self.source, self.transform = reader, source, transform
        names = getattr(reader, "class_name_to_idx", None) or getattr(reader, "class_to_idx", None) or {}
        self.classes = [name for name, _ in sorted(names.items(), key=lambda kv: kv[1])]
        targets = reader.targets if hasattr(reader, "targets") else reader.iter_targets()
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def _name(self, index: int) -> str:
        try:
            return self.reader.filename(index) or f"sample {index}"
        except (AssertionError, KeyError, TypeError):
            return f"sample {index}"

    def __getitem__(self, index: int):
        member, target = self.reader[index]
        try:
            img = Image.open(member).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise CatchupError(f"cannot decode {self._name(index)} in {self.source}: {err}") from err
        return (img if self.transform is None else self.transform(img)), int(target)


def tar_images(source: str) -> ReaderImages:
    """The tar file or folder of tars at `source` through timm's tar reader.

    Tar handles are not cached: handles opened before the loader forks its workers would share one file offset.
    """
    from timm.data.readers import create_reader
    try:
        reader = create_reader("", root=source, cache_tarfiles=False)
        names = sorted(reader.class_name_to_idx)
        if [reader.class_name_to_idx[n] for n in names] != list(range(len(names))):
            # timm numbers classes in natural order (c2 before c10); folders, as torchvision, in sorted order
            reader = create_reader("", root=source, cache_tarfiles=False, class_map={n: i for i, n in enumerate(names)})
    except (AssertionError, OSError, ValueError, tarfile.TarError) as err:
        raise CatchupError(f"cannot read the tar files at {source}: {err}") from None
    return ReaderImages(reader, source)


def hfds_images(name: str, cache_dir: str | None, split: str) -> ReaderImages:
    """Split `split` of the Hugging Face dataset `hfds/<path>` through timm's reader (random access)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CatchupError(f"{name} needs the Hugging Face datasets package: pip install datasets") from None
    from timm.data.readers import create_reader
    try:
        reader = create_reader(name, root=cache_dir, split=split)
    except Exception as err:  # datasets raises many types (missing files, unknown split, no network)
        raise CatchupError(f"{name}: cannot load split {split!r}: {type(err).__name__}: {err}") from None
    return ReaderImages(reader, f"{name} ({split})")


def wds_num_classes(data_dir: str) -> int | None:
    """`num_classes` from the shards' `_info.json` when it says."""
    for name in ("_info.json", "info.json"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                info = json.load(f)
            value = info.get("num_classes")
            return int(value) if value else None
    return None


def wds_dataset(name: str, data_dir: str, split: str, training: bool, batch_size: int, seed: int):
    """timm's WebDataset reader for `split` (no transform attached; SeededStream applies it)."""
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise CatchupError(f"{name} needs the webdataset package: pip install webdataset") from None
    from timm.data import create_dataset
    try:
        return create_dataset(name, root=data_dir, split=split, is_training=training, batch_size=batch_size,
                              seed=seed)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise CatchupError(f"{name}: cannot open split {split!r} in {data_dir}: {err}; {WDS_LAYOUT}") from None
