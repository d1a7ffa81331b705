"""ImageNet-style data: timm's transforms from the recipe keys, tar and WebDataset readers, repeated augmentation,
per-sample seeding; each format trains the quickstart model and resumes exactly."""
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from catchup import CatchupError
from catchup.config import load_config
from catchup.data import Augment, build_datasets, dataset_labels
from catchup.data.sampling import EpochSeeded, RepeatedAugmentation, item_seed
from tests.helpers import load_safetensors, run_train

pytestmark = pytest.mark.usefixtures("one_thread")
RSB = "configs/imagenet/resnet50_catchup_300ep.yaml"
CLASSES = ("c1", "c10", "c2")   # sorted order; timm's natural order would put c2 before c10


def _jpeg(g: torch.Generator, h: int = 40, w: int = 48) -> bytes:
    pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def write_folders(root, n_train=6, n_val=2):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{cls}_{i}.JPEG").write_bytes(_jpeg(g))
    return root


def write_tars(folders, root):
    """train.tar / val.tar holding the class folders, as ImageNet's own tar of class tars would unpack to."""
    root.mkdir(parents=True)
    for split in ("train", "val"):
        with tarfile.open(root / f"{split}.tar", "w") as tar:
            for cls in CLASSES:
                for path in sorted((folders / split / cls).iterdir()):
                    tar.add(path, arcname=f"{cls}/{path.name}")
    return root


def write_wds(folders, root, shard_size=5):
    """WebDataset shards (<key>.jpg + <key>.cls) and timm's _info.json with the split's shards and counts."""
    root.mkdir(parents=True)
    info = {"num_classes": len(CLASSES), "splits": {}}
    for split, name in (("train", "train"), ("val", "validation")):
        samples = [(p, label) for label, cls in enumerate(CLASSES)
                   for p in sorted((folders / split / cls).iterdir())]
        files, lengths = [], []
        for s in range(0, len(samples), shard_size):
            fname = f"tiny-{name}-{s // shard_size:04d}.tar"
            with tarfile.open(root / fname, "w") as tar:
                for path, label in samples[s:s + shard_size]:
                    for ext, data in (("jpg", path.read_bytes()), ("cls", str(label).encode())):
                        member = tarfile.TarInfo(f"{path.stem}.{ext}")
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))
            files.append(fname)
            lengths.append(len(samples[s:s + shard_size]))
        info["splits"][name] = {"name": name, "num_samples": len(samples), "filenames": files,
                                "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def write_hfds(folders, root):
    """A local Hugging Face dataset: data/<split>-00000-of-00001.parquet with an image and a ClassLabel column."""
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    (root / "data").mkdir(parents=True)
    for split, name in (("train", "train"), ("val", "validation")):
        rows = [({"bytes": p.read_bytes(), "path": None}, label) for label, cls in enumerate(CLASSES)
                for p in sorted((folders / split / cls).iterdir())]
        table = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                           features=features)
        table.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("imagenet"))


def _same_output(a, b, img, seed=3):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    x = a(img)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return torch.equal(x, b(img))


# ---------------------------------------------------------------- transforms from recipe keys


def test_rsb_a2_transform_equals_timm_create_transform(folders):
    cfg = load_config(RSB, {"data_dir": str(folders)})
    train, val, info = build_datasets(cfg.dataset, cfg.data_dir, augment=Augment.from_config(cfg))
    expected = create_transform(input_size=224, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                                vflip=0.0, color_jitter=0.0, auto_augment="rand-m7-mstd0.5-inc1",
                                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                                re_prob=0.0, re_mode="pixel", re_count=1)
    assert repr(train.transform) == repr(expected)
    img = Image.open(train.samples[0][0]).convert("RGB")
    assert _same_output(train.transform, expected, img)
    expected_eval = create_transform(input_size=224, is_training=False, interpolation="bicubic", crop_pct=0.95,
                                     mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    assert repr(val.transform) == repr(expected_eval) and _same_output(val.transform, expected_eval, img)
    assert (info.crop_pct, info.interpolation, info.input_size) == (0.95, "bicubic", 224)


def test_model_config_fills_crop_pct_and_interpolation(folders):
    _, val, info = build_datasets("imagefolder", str(folders), augment=Augment(model="resnet50"))
    assert (info.crop_pct, info.interpolation) == (0.95, "bicubic")     # timm's resnet50.a1_in1k config
    assert "Resize(size=235, interpolation=bicubic" in repr(val.transform)   # floor(224 / 0.95)
    _, _, info = build_datasets("imagefolder", str(folders), augment=Augment(model="vgg16"))
    assert (info.crop_pct, info.interpolation) == (0.875, "bilinear")


BASE = Augment(reprob=0.25)     # erasing on, so that remode and recount have something to change
CHANGES = [("aa", "rand-m9-mstd0.5-inc1"), ("reprob", 0.5), ("remode", "const"), ("recount", 3),
           ("scale", (0.5, 1.0)), ("ratio", (0.5, 2.0)), ("hflip", 0.0), ("vflip", 0.5), ("color_jitter", 0.1),
           ("train_interpolation", "bilinear")]


@pytest.mark.parametrize("key,value", CHANGES, ids=[k for k, _ in CHANGES])
def test_each_key_changes_the_training_transform(folders, key, value):
    base = build_datasets("imagefolder", str(folders), input_size=32, augment=BASE)[0].transform
    changed = build_datasets("imagefolder", str(folders), input_size=32,
                             augment=Augment(**{**BASE.__dict__, key: value}))[0].transform
    assert repr(changed) != repr(base)


@pytest.mark.parametrize("key,value", [("crop_pct", 0.5), ("interpolation", "nearest")])
def test_eval_keys_change_the_eval_transform(folders, key, value):
    base = build_datasets("imagefolder", str(folders), input_size=32)[1].transform
    changed = build_datasets("imagefolder", str(folders), input_size=32, augment=Augment(**{key: value}))[1].transform
    assert repr(changed) != repr(base)


@pytest.mark.parametrize("aa", ["rand-mX", "rand-m9-foo", "rand-m7.5", "randaug-m9", "augmix-q3", "v9"])
def test_malformed_auto_augment_is_refused(folders, aa):
    with pytest.raises(CatchupError, match="recipe key 'aa'"):
        build_datasets("imagefolder", str(folders), augment=Augment(aa=aa))


@pytest.mark.parametrize("key,value", [("reprob", 1.5), ("remode", "noise"), ("scale", (0.9, 0.1)),
                                       ("train_interpolation", "cubic"), ("crop_pct", 0.0)])
def test_out_of_range_values_are_refused(folders, key, value):
    with pytest.raises(CatchupError, match=f"recipe key '{key}'"):
        build_datasets("imagefolder", str(folders), augment=Augment(**{key: value}))


def test_augmentation_keys_on_a_fixed_recipe_dataset_are_refused():
    with pytest.raises(CatchupError, match="recipe key 'aa' applies to ImageNet-style data"):
        build_datasets("digits", None, augment=Augment(aa="rand-m9"))
    build_datasets("digits", None, augment=Augment(model="resnet50"))      # the model name alone is fine


# ---------------------------------------------------------------- per-sample seeding and repeated augmentation


def test_seeded_samples_do_not_depend_on_the_global_random_state(folders):
    train = build_datasets("imagefolder", str(folders), input_size=32,
                           augment=Augment(aa="rand-m9-mstd0.5-inc1", reprob=0.5))[0]
    seeded = EpochSeeded(train, seed=1)
    first = seeded[(4, 0)][0]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert torch.equal(seeded[(4, 0)][0], first)             # same (index, draw): same augmentation
    assert not torch.equal(seeded[(4, 1)][0], first)         # a repeat of the image: another augmentation
    seeded.set_epoch(1)
    assert not torch.equal(seeded[(4, 0)][0], first)
    after = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    untouched = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    assert after[0] == untouched[0] and np.array_equal(after[1], untouched[1]) and torch.equal(after[2], untouched[2])


@pytest.mark.parametrize("processes,repeats", [(1, 3), (2, 2), (3, 3), (4, 2)])
def test_repeated_augmentation_gives_each_process_timms_stream(processes, repeats):
    from accelerate.data_loader import BatchSamplerShard
    from timm.data.distributed_sampler import RepeatAugSampler
    from torch.utils.data import BatchSampler

    n, batch, seed, epoch = 300, 4, 5, 2
    sampler = RepeatedAugmentation(n, repeats, processes, batch, seed=seed)
    sampler.set_epoch(epoch)
    seen = []
    for rank in range(processes):
        shard = BatchSamplerShard(BatchSampler(sampler, batch, drop_last=True), num_processes=processes,
                                  process_index=rank)
        got = [i for b in shard for i, _ in b]
        reference = RepeatAugSampler(range(n), num_replicas=processes, rank=rank, num_repeats=repeats)
        reference.set_epoch(item_seed(seed, epoch) % 2**62)
        expected = list(reference)[:len(got)]
        assert got == expected and len(got) == len(reference) // batch * batch
        seen += [draw for b in shard for _, draw in b]
    assert sorted(seen) == list(range(len(seen)))             # every item has its own augmentation draw
    # timm's layout: the permutation with each index repeated, dealt out to the processes in turn, so the
    # copies of an image go to different processes at the same step
    order = torch.randperm(n, generator=torch.Generator().manual_seed(item_seed(seed, epoch) % 2**62)).tolist()
    first_steps = [[i for i, _ in b] for b in BatchSampler(sampler, batch, drop_last=True)][:processes]
    assert [b[0] for b in first_steps] == [order[r // repeats] for r in range(processes)]


# ---------------------------------------------------------------- tar files and WebDataset shards


def test_tar_files_give_the_folder_samples(folders, tmp_path):
    tars = write_tars(folders, tmp_path / "tars")
    f_train, f_val, f_info = build_datasets("imagefolder", str(folders), input_size=32, train_transform=False)
    t_train, t_val, t_info = build_datasets("imagefolder", str(tars), input_size=32, train_transform=False)
    assert t_train.classes == f_train.classes == list(CLASSES) and t_info == f_info
    assert sorted(dataset_labels(t_train)) == sorted(dataset_labels(f_train))
    for folder_set, tar_set in ((f_train, t_train), (f_val, t_val)):
        by_name = {"/".join(p.split("/")[-2:]): i for i, (p, _) in enumerate(folder_set.samples)}
        assert sorted(by_name) == sorted(tar_set.reader.filename(i) for i in range(len(tar_set)))
        for i in range(len(tar_set)):
            j = by_name[tar_set.reader.filename(i)]
            (x, y), (x_f, y_f) = tar_set[i], folder_set[j]
            assert y == y_f and torch.equal(x, x_f)


def test_damaged_tar_member_is_named(folders, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for split in ("train", "val"):
        with tarfile.open(root / f"{split}.tar", "w") as tar:
            for cls in CLASSES:
                data = b"not a jpeg" if split == "train" and cls == "c10" else (folders / "val" / cls /
                                                                                  f"{cls}_0.JPEG").read_bytes()
                member = tarfile.TarInfo(f"{cls}/x.JPEG")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    train, _, _ = build_datasets("imagefolder", str(root), input_size=32)
    bad = [i for i in range(3) if train.reader.filename(i) == "c10/x.JPEG"][0]
    assert train.targets[bad] == 1               # sorted class order, not timm's natural order
    with pytest.raises(CatchupError, match=r"cannot decode c10/x\.JPEG in .*train\.tar"):
        train[bad]


def test_hugging_face_dataset_gives_the_folder_samples(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    local = write_hfds(folders, tmp_path / "hf")
    name = f"hfds/{local}"
    f_train, f_val, f_info = build_datasets("imagefolder", str(folders), input_size=32, train_transform=False)
    h_train, h_val, h_info = build_datasets(name, str(tmp_path / "cache"), input_size=32, train_transform=False)
    assert h_train.classes == list(CLASSES) and h_info == f_info
    assert dataset_labels(h_train) == dataset_labels(f_train)
    for i in (0, 7, len(f_train) - 1):
        assert torch.equal(h_train[i][0], f_train[i][0]) and h_train[i][1] == f_train[i][1]
    assert torch.equal(h_val[5][0], f_val[5][0])
    with pytest.raises(CatchupError, match="cannot load split 'test'"):
        build_datasets(name, str(tmp_path / "cache"), splits=("test", "validation"))


def test_webdataset_reader_and_errors(folders, tmp_path):
    shards = write_wds(folders, tmp_path / "wds")
    train, val, info = build_datasets("wds/tiny", str(shards), input_size=32)
    assert info.num_classes == 3 and info.family == "imagenet"
    targets = sorted(t for _, t in val)                      # the eval split in shard order, eval transform
    assert targets == [0, 0, 1, 1, 2, 2]
    with pytest.raises(CatchupError, match="split 'test'"):
        build_datasets("wds/tiny", str(shards), splits=("test", "validation"))
    with pytest.raises(CatchupError, match="train_fraction needs random access"):
        build_datasets("wds/tiny", str(shards), train_fraction=0.5)


def test_webdataset_stream_layout_for_accelerate_sharding(folders, tmp_path):
    """Under two processes each reader reads its own shards; after Accelerate's prepare (which shards iterable
    datasets again) each process gets exactly its reader's samples; the other process's fillers are never read."""
    from accelerate.data_loader import prepare_data_loader
    from catchup.recipe import make_loaders
    shards = write_wds(folders, tmp_path / "wds", shard_size=3)
    cfg = load_config("configs/quickstart.yaml", {"dataset": "wds/tiny", "data_dir": str(shards), "batch_size": 4,
                                                  "workers": 0})
    for rank in range(2):
        train, val, _ = build_datasets("wds/tiny", str(shards), input_size=16, train_transform=False)
        train.reader.dist_rank, train.reader.dist_num_replicas = rank, 2      # as torch.distributed would set
        loader, _ = make_loaders(cfg, train, val, num_processes=2)
        loader.dataset.set_epoch(0)
        alone = [int(t) for _, t in loader.dataset._samples()]
        prepared = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False,
                                       dispatch_batches=False)
        prepared.set_epoch(0)
        got = [int(t) for _, y in prepared for t in y]
        assert got == alone and len(got) == len(prepared) * 2 == 10  # timm: ceil(18 / 2) rounded up to batches of 2
    with pytest.raises(CatchupError, match="aug_repeats needs random access"):
        make_loaders(load_config("configs/quickstart.yaml", {"aug_repeats": 3}), train, val, num_processes=1)


def test_repeated_augmentation_through_accelerate_prepare():
    """make_loaders + Accelerate's prepare for two processes: each process loads timm's rank stream, each
    sample with its own augmentation draw."""
    from accelerate.data_loader import prepare_data_loader
    from timm.data.distributed_sampler import RepeatAugSampler
    from catchup.recipe import make_loaders

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, index):
            return index, torch.rand(()).item()          # the sample's own augmentation draw

    cfg = load_config("configs/quickstart.yaml", {"batch_size": 8, "aug_repeats": 2, "workers": 0, "seed": 3})
    draws = []
    for rank in range(2):
        train, _ = make_loaders(cfg, Indices(), Indices(), num_processes=2)
        prepared = prepare_data_loader(train, num_processes=2, process_index=rank, put_on_device=False,
                                       use_seedable_sampler=True, data_seed=cfg.seed)
        prepared.set_epoch(1)
        got = [(int(i), float(d)) for x, d in prepared for i, d in zip(x, d)]
        reference = RepeatAugSampler(range(40), num_replicas=2, rank=rank, num_repeats=2)
        reference.set_epoch(item_seed(3, 1) % 2**62)
        assert [i for i, _ in got] == list(reference)[:len(got)] and len(got) == 20
        draws += [d for _, d in got]
    assert len(set(draws)) == len(draws)     # the two copies of an image are augmented differently


# ---------------------------------------------------------------- training the quickstart model on each format


QUICK = ["--input-size", "16", "--train-fraction", "1.0", "--batch-size", "6",
         "--eval-batch-size", "6", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25"]


def _weights_equal(a, b):
    wa, wb = load_safetensors(a / "model.safetensors"), load_safetensors(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("fmt,workers", [("folder", 0), ("folder", 2), ("tar", 0), ("hfds", 0), ("wds", 0),
                                         ("wds", 2)])
def test_one_epoch_and_exact_resume_on_each_format(folders, tmp_path, monkeypatch, fmt, workers):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = {"folder": lambda: folders, "tar": lambda: write_tars(folders, tmp_path / "tars"),
            "hfds": lambda: write_hfds(folders, tmp_path / "hf"), "wds": lambda: write_wds(folders, tmp_path / "wds")}[fmt]()
    dataset = {"wds": "wds/tiny", "hfds": f"hfds/{data}"}.get(fmt, "imagefolder")
    data_dir = tmp_path / "cache" if fmt == "hfds" else data
    args = [*QUICK, "--dataset", dataset, "--data-dir", str(data_dir), "--workers", str(workers)]
    if fmt != "wds":
        args += ["--aug-repeats", "2"]
    # 18 samples in batches of 6; timm's WebDataset epoch gives each of W workers ceil(18 / W) samples rounded up
    # to whole batches: 2 workers read 12 each, 4 steps
    steps = 4 if (fmt, workers) == ("wds", 2) else 3
    run_train(tmp_path / "straight", *args, "--epochs", "1")
    summary = (tmp_path / "straight" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and summary[1].startswith(f"0,{steps},")
    run_train(tmp_path / "split", *args, "--epochs", "2", "--max-steps", str(steps + 1))   # stops inside epoch 1
    run_train(tmp_path / "split", *args, "--epochs", "2", "--resume")
    run_train(tmp_path / "whole", *args, "--epochs", "2")
    assert _weights_equal(tmp_path / "split", tmp_path / "whole")


def test_bad_auto_augment_stops_train_py_with_one_line(folders, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--dataset", "imagefolder",
                           "--data-dir", str(folders), "--aa", "rand-m9-foo", "--output", str(tmp_path / "x")],
                          cwd=root, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error: recipe key 'aa'") and "'foo'" in lines[-1]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_loader_benchmark_sizes_workers_from_its_own_rates(tmp_path):
    import math
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import loader
    result = loader.main(["--quick", "--gpu-images-per-s", "1000", "--json", str(tmp_path / "l.json")])
    names = [row["pipeline"] for row in result["imagenet"]]
    assert names[0] == "decode only" and any("rsb_a2" in n for n in names) and any("cutmix" in n for n in names)
    for row in result["imagenet"]:
        assert row["images_per_s"] > 0 and row["workers_for_gpu"] == math.ceil(1000 / row["images_per_s"])
    assert json.loads((tmp_path / "l.json").read_text())["gpu_images_per_s"] == 1000
    assert 300 * 1024 > result["jpeg_mean_kb"] * 1024 > 10 * 1024        # real JPEGs, not flat colour


def test_evaluate_runs_every_suite_on_webdataset_shards_as_on_the_same_image_folder(folders, tmp_path):
    """A streamed eval set has no indices: the deformation suite warps it in stream order, which for one process
    and no loader workers is the folder's order, so both give the same numbers."""
    import shutil

    import yaml

    from evaluate import main as evaluate
    run = tmp_path / "wds_run"
    run_train(run, *QUICK, "--dataset", "wds/tiny", "--data-dir", str(write_wds(folders, tmp_path / "wds")),
              "--epochs", "1")
    as_folder = tmp_path / "folder_run"
    shutil.copytree(run, as_folder, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    cfg = yaml.safe_load((as_folder / "config.yaml").read_text())
    cfg.update(dataset="imagefolder", data_dir=str(folders))
    (as_folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    reports = [evaluate([str(r), "--suite", "clean,fgsm,deformation,reliance", "--deform-draws", "2",
                         "--workers", "0", "--output", str(tmp_path / f"eval_{r.name}")]) for r in (run, as_folder)]
    wds, folder = (json.loads((r / "report.json").read_text())["results"][0] for r in reports)
    assert wds["dataset"] == "wds/tiny" and folder["dataset"] == "imagefolder" and wds["n"] == folder["n"] == 6
    assert wds["clean"] == pytest.approx(folder["clean"]) and wds["fgsm"] == folder["fgsm"]
    assert wds["deformation_draws"] == folder["deformation_draws"] and wds["reliance"] == folder["reliance"]
