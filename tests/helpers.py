"""Shared test helpers: a tiny staged model, a slow Catch-up Mix reference, running train.py in-process, reading W&B
offline run files."""
from __future__ import annotations

import importlib.util
import math
import struct
import sys
import time
from pathlib import Path

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

TINY = ["--model-kwargs", "{width: 4}", "--train-fraction", "0.25", "--batch-size", "32", "--epochs", "2",
        "--wandb-mode", "disabled", "--workers", "0", "--log-every", "2", "--eval-every", "1"]


class TinyNet(nn.Module):
    """Three conv stages with timm-style feature_info (no BatchNorm: a second forward gives the same features)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.num_classes = num_classes
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)
        self.feature_info = [dict(module="a", num_chs=4, reduction=1), dict(module="b", num_chs=6, reduction=2),
                             dict(module="c", num_chs=8, reduction=4)]

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


class HeadNet(nn.Module):
    """timm's classifier interface in miniature: feature_info, forward_features, global_pool, forward_head."""

    def __init__(self, num_classes=5, stride=2):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=stride), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, stride=stride), nn.ReLU())
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = nn.Linear(8, num_classes)
        self.feature_info = [dict(module="a", num_chs=4, reduction=1), dict(module="b", num_chs=6, reduction=stride),
                             dict(module="c", num_chs=8, reduction=stride ** 2)]

    def forward_features(self, x):
        return self.c(self.b(self.a(x)))

    def forward_head(self, x):
        return self.fc(self.global_pool(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc


def reference_keep(h: torch.Tensor, index: torch.Tensor, lam: float) -> list[set[int]]:
    """Eqs. (4)-(5) written out with Python loops in float64: the channels each sample keeps."""
    h64 = h.detach().to(torch.float64)
    batch, channels = h.shape[:2]
    n_keep = math.floor(lam * channels)

    def influence(sample):
        norms = [math.sqrt(sum(float(v) ** 2 for v in h64[sample, c].flatten())) for c in range(channels)]
        total = sum(norms)
        return [n / total if total > 0 else 0.0 for n in norms]

    kept = []
    for i in range(batch):
        own, partner = influence(i), influence(int(index[i]))
        rfi = [own[c] - partner[c] for c in range(channels)]
        kept.append(set(sorted(range(channels), key=lambda c: (rfi[c], c))[:n_keep]))
    return kept


def reference_catchup(h: torch.Tensor, index: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Eq. (6) from the reference keep sets."""
    h64 = h.detach().to(torch.float64)
    out = torch.empty_like(h64)
    for i, keep in enumerate(reference_keep(h, index, lam)):
        for c in range(h.shape[1]):
            out[i, c] = h64[i, c] if c in keep else h64[int(index[i]), c]
    return out, math.floor(lam * h.shape[1]) / h.shape[1]


def run_train(output: Path, *extra: str, config: str = "configs/quickstart.yaml", tiny: bool = True) -> None:
    """train.main in this process (with the TINY overrides unless ``tiny=False``); Accelerate's process-wide
    state is reset before and after."""
    import train
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        train.main(["--config", config, "--output", str(output), *(TINY if tiny else ()), *extra])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def snapshot(folder: Path) -> dict[str, str]:
    """Each file's sha256 (and each folder) under ``folder``: equal snapshots mean nothing was written there."""
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def train_step(mixer, model, x, y):
    """One step of the engine's loss contract: soft-target CE plus the mixer's auxiliary loss; backward."""
    from timm.loss import SoftTargetCrossEntropy
    xm, soft = mixer(x, y)
    out = model(xm)
    loss = SoftTargetCrossEntropy()(out, soft)
    aux = mixer.auxiliary_loss(out)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    return xm, soft, loss, aux


def load_benchmark(name):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module    # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The protobuf records of a `.wandb` run file, once its closing 'exit' record is there.

    W&B's core process may still be writing the file when `finish()` returns on a busy machine, so the file
    is read again until the run's exit record appears (or the timeout passes).
    """
    deadline = time.monotonic() + timeout
    while True:
        records = list(_read_wandb_log(path))
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _read_wandb_log(path: Path):
    """W&B no longer ships a Python reader for its transaction log; the format is LevelDB's log: a 7-byte
    header, then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    raw, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        pending += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
