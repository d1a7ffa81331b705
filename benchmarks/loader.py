"""Images per second of one loader worker on the ImageNet training pipeline, and the workers a GPU needs.

    python benchmarks/loader.py                     # 64 generated JPEGs, each pipeline for ~5 s
    python benchmarks/loader.py --quick             # a smoke run of a few seconds
    python benchmarks/loader.py --gpu-images-per-s 5000 --json loader.json

A DataLoader worker is one process running one thread (PyTorch sets each worker to one intra-op thread), so
the figure that sizes `workers` is what one single-threaded process sustains on a core of its own: this script
measures it in this process, limited to one thread, per CPU second (wall-clock rates are printed too), on JPEGs generated at ImageNet's typical sizes (500x375 and 400x350, smooth
content plus noise, quality 90), read from disk through the project's own datasets (`build_datasets`,
`EpochSeeded`): file read, decode, augmentation, per-sample seeding, normalisation. Workers needed =
ceil(GPU images/s / worker images/s). The default GPU figure is NVIDIA's published ResNet-50 v1.5 training
throughput on one A100 80GB with mixed precision, 2470 images/s (DeepLearningExamples,
PyTorch/Classification/ConvNets/resnet50v1.5, "Training performance: NVIDIA DGX A100"); pass your own.

The CIFAR rows compare the project's uint8 tensor path (`PadCropFlip`) with the PIL pipeline torchvision
and timm would use for the same augmentation (RandomCrop(32, padding=4), flip, ToTensor, Normalize).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catchup.cli import run_cli  # noqa: E402
from catchup.config import load_config  # noqa: E402
from catchup.data import Augment, PadCropFlip, build_datasets  # noqa: E402
from catchup.data.sampling import EpochSeeded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"rsb_a2 (RandAugment, bicubic)": "configs/imagenet/resnet50_catchup_300ep.yaml",
           "cutmix_protocol (color jitter)": "configs/imagenet/resnet50_cutmix_clovaai_300ep.yaml"}
SIZES = ((500, 375), (400, 350))
A100_RESNET50_AMP = 2470.0   # images/s, NVIDIA DeepLearningExamples ResNet-50 v1.5 PyTorch, 1x A100 80GB, AMP


def write_jpegs(root: Path, count: int, seed: int = 0) -> float:
    """`count` JPEGs in root/{train,val}/c0/; returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for split in ("train", "val"):
        folder = root / split / "c0"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count if split == "train" else 1):
            w, h = SIZES[i % 2]
            coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
            pixels = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
            pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
            path = folder / f"{i}.JPEG"
            Image.fromarray(pixels).save(path, quality=90)
            sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def images_per_s(load, count: int, seconds: float) -> tuple[float, float]:
    """(wall, CPU) images/s of load(i, k) for k = 0, 1, ..., i = k mod `count`, until `seconds` of wall time
    pass (at least one pass). The CPU rate is what a worker sustains on a core of its own; on a machine busy
    with other jobs the wall rate is lower by the share of time the process waited for a core."""
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        load(done % count, done)
        done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= count:
            return done / elapsed, done / max(time.process_time() - cpu, 1e-9)


def run(images: int, seconds: float, gpu: float) -> dict:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mean_kb = write_jpegs(Path(tmp), images)
        plain = build_datasets("imagefolder", tmp, input_size=224, train_transform=False)[0]
        rows.append(("decode only", images_per_s(lambda i, k: Image.open(plain.samples[i][0]).convert("RGB"),
                                                 images, seconds)))
        rows.append(("eval (resize, center crop)", images_per_s(lambda i, k: plain[i], images, seconds)))
        for name, recipe in RECIPES.items():
            cfg = load_config(ROOT / recipe, {"data_dir": tmp})
            train = EpochSeeded(build_datasets("imagefolder", tmp, augment=Augment.from_config(cfg))[0], seed=0)
            rows.append((f"train {name}", images_per_s(lambda i, k, t=train: t[(i, k)], images, seconds)))
    cifar = _cifar_rows(seconds)
    table = [{"pipeline": name, "images_per_s": cpu_ips, "wall_images_per_s": wall_ips, "ms_per_image": 1000 / cpu_ips,
              "workers_for_gpu": math.ceil(gpu / cpu_ips)} for name, (wall_ips, cpu_ips) in rows]
    return {"load_average": os.getloadavg(), "jpeg_mean_kb": mean_kb, "gpu_images_per_s": gpu, "imagenet": table,
            "cifar": cifar}


def _cifar_rows(seconds: float) -> list[dict]:
    from torchvision import transforms
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.rand(3, 32, 32, generator=g) * 255).to(torch.uint8) for _ in range(256)]
    pils = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in tensors]
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    fast = PadCropFlip(32, mean, std, 3, pad=4, flip=True)
    pil = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor(), transforms.Normalize(mean, std)])
    rows = [("PadCropFlip on uint8 tensors", images_per_s(lambda i, k: fast(tensors[i]), 256, seconds)),
            ("torchvision PIL crop/flip/ToTensor", images_per_s(lambda i, k: pil(pils[i]), 256, seconds))]
    return [{"pipeline": name, "images_per_s": cpu_ips, "wall_images_per_s": wall_ips}
            for name, (wall_ips, cpu_ips) in rows]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="generated JPEGs (half 500x375, half 400x350)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per pipeline")
    parser.add_argument("--gpu-images-per-s", type=float, default=A100_RESNET50_AMP,
                        help="training images/s of one GPU to feed (default: ResNet-50, A100, mixed precision)")
    parser.add_argument("--quick", action="store_true", help="8 images, 0.5 s per pipeline")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    images, seconds = (8, 0.5) if args.quick else (args.images, args.seconds)
    result = run(images, seconds, args.gpu_images_per_s)
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    print(f"one loader worker (1 thread); load average {load}; JPEGs {result['jpeg_mean_kb']:.0f} KB on average")
    print("images/s and ms/image per CPU second (a worker with a core of its own); wall: images/s on this machine")
    print(f"{'pipeline':40s} {'images/s':>9s} {'ms/image':>9s} {'wall':>7s}  workers for {args.gpu_images_per_s:.0f} img/s")
    for row in result["imagenet"]:
        print(f"{row['pipeline']:40s} {row['images_per_s']:9.1f} {row['ms_per_image']:9.2f} "
              f"{row['wall_images_per_s']:7.1f}  {row['workers_for_gpu']}")
    fast, pil = (row["images_per_s"] for row in result["cifar"])
    for row in result["cifar"]:
        print(f"CIFAR {row['pipeline']:34s} {row['images_per_s']:9.0f} {'':9s} {row['wall_images_per_s']:7.0f}")
    print(f"CIFAR: the uint8 tensor path is {fast / pil:.1f}x the PIL pipeline")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
