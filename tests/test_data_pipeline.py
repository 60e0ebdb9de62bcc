"""The training data pipeline: lazy image folders, the index stream, DataLoader workers, exact resume with
workers, and per-rank shards under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import data as data_mod
from ddpm_fast import train as train_cli
from ddpm_fast.data import BatchStream, FolderDataset, batch_loader, load_data, load_image_folder


def _folder(root, sizes=((8, 8),) * 6, classes=("cat", "dog"), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def test_folder_dataset_is_lazy_and_equals_the_in_memory_load(tmp_path, monkeypatch):
    path = _folder(tmp_path / "f", sizes=((8, 8), (8, 8), (16, 16), (12, 20)))
    eager = load_image_folder(path, 3, 8)
    reads = []
    real_read = data_mod._read_image
    monkeypatch.setattr(data_mod, "_read_image", lambda *a: reads.append(a[0]) or real_read(*a))
    lazy = load_data(path, 8, 3)
    assert isinstance(lazy, FolderDataset) and reads == [], "construction must not decode pixels"
    assert len(lazy) == 8 and lazy.class_names == ["cat", "dog"] and lazy.labels.tolist() == [0] * 4 + [1] * 4
    assert lazy.notes == eager.notes and any("resized 4 of 8 images to 8x8" in n for n in lazy.notes)
    index = torch.tensor([7, 2, 2, 0])
    got = lazy.get(index)
    assert len(reads) == 4 and got.dtype == torch.uint8 and got.shape == (4, 8, 8, 3)
    assert torch.equal(got, eager.images[index])


def test_stream_is_the_generator_stream_and_flips_half(tmp_path):
    """One rank: the indices are randint over the set, then the flips, from the saved generator (the
    stream the in-memory trainer always drew); flips are fair coins."""
    gen = torch.Generator().manual_seed(7)
    stream = iter(BatchStream(gen.get_state(), 50, 16, hflip=True))
    flips = []
    for _ in range(40):
        item = next(stream)
        want_index = torch.randint(0, 50, (16,), generator=gen)
        want_flip = torch.rand(16, generator=gen) < 0.5
        assert torch.equal(item["index"], want_index) and torch.equal(item["flip"], want_flip)
        assert torch.equal(item["state"], gen.get_state())
        flips.append(item["flip"])
    rate = torch.cat(flips).float().mean().item()
    assert abs(rate - 0.5) < 4 * (0.25 / 640) ** 0.5, rate  # within 4 sigma of a fair coin
    assert next(iter(BatchStream(gen.get_state(), 50, 4, hflip=False)))["flip"] is None


def test_shards_are_disjoint_and_cover_the_set():
    state = torch.Generator().manual_seed(0).get_state()
    seen = []
    for rank in range(3):
        stream = iter(BatchStream(state, 10, 64, hflip=False, rank=rank, world=3))
        seen.append(set(torch.cat([next(stream)["index"] for _ in range(5)]).tolist()))
    assert seen == [{0, 3, 6, 9}, {1, 4, 7}, {2, 5, 8}]
    with pytest.raises(data_mod.DataError, match="rank 2 would get none"):
        BatchStream(state, 2, 4, hflip=False, rank=2, world=3)


def test_workers_give_the_same_batches_in_order(tmp_path):
    folder = FolderDataset(_folder(tmp_path / "f"), 3, 8)
    state = torch.Generator().manual_seed(3).get_state()
    runs = []
    for workers in (0, 2):
        batches = batch_loader(folder, BatchStream(state, len(folder), 5, hflip=True), workers)
        runs.append([next(batches) for _ in range(6)])
        batches.close()
    for a, b in zip(*runs, strict=True):
        for key in ("index", "images", "labels", "flip", "state"):
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(a["images"], folder.get(a["index"]))


def test_a_bad_file_found_late_names_it(tmp_path):
    path = _folder(tmp_path / "f", classes=("a",))
    folder = FolderDataset(path, 3, 8)
    with open(folder.files[1], "r+b") as f:  # the header still scans; the pixels do not decode
        f.truncate(60)
    batches = batch_loader(folder, BatchStream(torch.Generator().manual_seed(0).get_state(), 6, 6, False), 1)
    with pytest.raises(data_mod.DataError, match="1.png: cannot read image") as info:
        for _ in range(5):
            next(batches)
    batches.close()
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value), "the worker's traceback stays there"


def test_a_file_lost_mid_run_is_one_line_with_workers(tmp_path, capsys, monkeypatch):
    """A file deleted after the scan, read by a worker process: exit 2 and one line naming the file."""
    path = _folder(tmp_path / "f", classes=("a",))
    real = FolderDataset.__init__

    def scan_then_lose(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.unlink(self.files[2])  # listed by the scan, gone when a worker reads it

    monkeypatch.setattr(FolderDataset, "__init__", scan_then_lose)
    args = TRAIN + ["--data", path, "--workers", "2", "--steps", "50", "--out", str(tmp_path / "run")]
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ddpm_fast.train: error: ") and "2.png: cannot read image" in err[-1], err
    assert not any("Traceback" in line or "worker process" in line for line in err), err


TRAIN = ["--config", "tiny", "--batch-size", "4", "--num-timesteps", "50", "--warmup", "2", "--no-progress",
         "--hflip", "on"]


def _ckpt(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


def test_resume_with_workers_is_exact(tmp_path):
    """An image folder read by 2 workers: 3 steps + --resume to 6 == 6 straight == 6 with no workers."""
    path = _folder(tmp_path / "f", sizes=((8, 8),) * 5 + ((10, 12),), classes=("x",))
    runs = {}
    for name, workers in (("straight", "2"), ("plain", "0")):
        out = str(tmp_path / name)
        assert train_cli.main(TRAIN + ["--data", path, "--steps", "6", "--workers", workers, "--out", out]) == 0
        runs[name] = _ckpt(out)
    out = str(tmp_path / "resumed")
    assert train_cli.main(TRAIN + ["--data", path, "--steps", "3", "--workers", "2", "--out", out]) == 0
    assert train_cli.main(TRAIN + ["--data", path, "--steps", "6", "--workers", "2", "--out", out, "--resume"]) == 0
    runs["resumed"] = _ckpt(out)
    for other in ("plain", "resumed"):
        for part in ("model", "ema"):
            for k, v in runs["straight"][part].items():
                assert torch.equal(v, runs[other][part][k]), f"{other}: {part}.{k} differs"
        for k, v in runs["straight"]["rng"][0].items():
            assert torch.equal(v, runs[other]["rng"][0][k]), f"{other}: rng {k} differs"


SHARD_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from ddpm_fast.data import load_data
from ddpm_fast.distributed import Dist
from ddpm_fast.trainer import Trainer, TrainConfig

cfg = TrainConfig(data=sys.argv[1], config="tiny", batch_size=8, workers=1, device="cpu", hflip="off")
ctx = Dist("cpu")
trainer = Trainer(cfg, load_data(cfg.data, 8, 3), ctx)
seen = torch.cat([trainer._next_batch()["index"] for _ in range(6)]).tolist()
gathered = [None] * ctx.world
dist.all_gather_object(gathered, seen)
if ctx.rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump({"world": ctx.world, "seen": gathered}, f)
ctx.close()
"""


@pytest.mark.slow
def test_torchrun_ranks_read_disjoint_shards(tmp_path):
    path = _folder(tmp_path / "f", classes=("a",), sizes=((8, 8),) * 10)
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT)
    result = tmp_path / "seen.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), path,
           str(result)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["world"] == 2
    rank0, rank1 = (set(s) for s in got["seen"])
    assert rank0 and rank1 and not rank0 & rank1 and rank0 | rank1 <= set(range(10))
    assert rank0 <= {0, 2, 4, 6, 8} and rank1 <= {1, 3, 5, 7, 9}
