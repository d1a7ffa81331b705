"""Datasets, per-class subsets and transforms (see `build_datasets`)."""
from catchup.data.augment import Augment
from catchup.data.datasets import DATASETS, FASHION_MNIST_DEB_DIR, ArrayDataset, ImageList, build_datasets, load_image
from catchup.data.subsets import dataset_labels, per_class_subset
from catchup.data.transforms import DataInfo, PadCropFlip, build_eval_transform, build_train_transform

__all__ = [
    "Augment", "DATASETS", "FASHION_MNIST_DEB_DIR", "ArrayDataset", "DataInfo", "ImageList", "PadCropFlip", "build_datasets",
    "build_eval_transform", "build_train_transform", "dataset_labels", "load_image", "per_class_subset",
]
