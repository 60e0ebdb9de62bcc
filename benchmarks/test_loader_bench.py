"""The training data loader on a large image folder: images/s with 0, 1 and 2 workers, and peak RSS.

The benchmark writes its own folder of PNGs (smooth random images, made here, never committed):
DDPM_FAST_LOADER_BENCH=full writes 20,000 at 256x256 (and reads a 2,000-image subset as well, to show that
peak memory does not grow with the folder); by default (CI) a quick pass writes 300 at 64x64 (and a
100-image subset). Each measurement runs in a fresh process (python -c), so its peak RSS (ru_maxrss of the
process, and of its largest worker) is its own: it pulls batches of 64 through ddpm_fast.data.batch_loader
(the trainer's path: the index stream, workers decoding whole batches, 2 ahead each) and reports images/s
after the first batch. Full size also times one training step of the celebahq256 preset at batch 2 on the
same machine, the number the loader has to keep up with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from harness import record

FULL = os.environ.get("DDPM_FAST_LOADER_BENCH", "quick") == "full"
COUNT, SUBSET, SIZE = (20000, 2000, 256) if FULL else (300, 100, 64)
BATCH, BATCHES = 64, (20 if FULL else 3)

MEASURE = """
import json, resource, sys, time
import torch
from ddpm_fast.data import BatchStream, batch_loader, load_data
path, workers, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = load_data(path, {size}, 3)
stream = BatchStream(torch.Generator().manual_seed(0).get_state(), len(data), {batch}, hflip=True)
it = batch_loader(data, stream, workers)
next(it)
start = time.perf_counter()
for _ in range(batches):
    next(it)
seconds = time.perf_counter() - start
del it  # the workers exit: their peak is then in RUSAGE_CHILDREN
self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(dict(images_per_s=batches * {batch} / seconds, rss_mb=self_mb, worker_rss_mb=child_mb)))
"""


def _write_folder(root: str, count: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        name = os.path.join(root, f"{i:05d}.png")
        if os.path.exists(name):
            continue
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((SIZE, SIZE), Image.BICUBIC).save(name, compress_level=1)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("loader")
    big = _write_folder(str(base / "all"), COUNT)
    subset = str(base / "subset")
    os.makedirs(subset)
    for name in sorted(os.listdir(big))[:SUBSET]:
        os.link(os.path.join(big, name), os.path.join(subset, name))
    return {COUNT: big, SUBSET: subset}


def _measure(path: str, workers: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = MEASURE.format(size=SIZE, batch=BATCH)
    res = subprocess.run([sys.executable, "-c", code, path, str(workers), str(BATCHES)], capture_output=True,
                         text=True, env=env, timeout=1800, cwd=os.path.dirname(path))
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _train_step_images_per_s() -> float:
    from ddpm_fast import NoiseSchedule, UNet, UNetConfig, training_loss

    model = UNet(UNetConfig.from_name("celebahq256", dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = NoiseSchedule.linear(1000)
    x = torch.randn(2, 3, 256, 256)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        loss = training_loss(model, schedule, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        best = min(best, time.perf_counter() - start)
    return 2 / best


def test_loader_throughput_and_memory(benchmark, folders):
    rows = []
    for workers in (0, 1, 2):
        for count in (SUBSET, COUNT):
            rows.append(dict(images=count, workers=workers, **_measure(folders[count], workers)))
    lines = [f"\nloader: {SIZE}x{SIZE} PNG folder, batches of {BATCH}, {BATCHES} batches timed "
             f"(CPU, {os.cpu_count()} cores)",
             "| folder images | workers | images/s | peak RSS main (MB) | peak RSS per worker (MB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        worker = f"{r['worker_rss_mb']:.0f}" if r["workers"] else "-"
        lines.append(f"| {r['images']} | {r['workers']} | {r['images_per_s']:.0f} | {r['rss_mb']:.0f} | {worker} |")
    train_rate = _train_step_images_per_s() if FULL else None
    if train_rate:
        lines.append(f"\ntraining step, celebahq256 preset, batch 2, fp32, CPU: {train_rate:.2f} images/s")
    print("\n".join(lines))
    for workers in (0, 1, 2):  # memory does not follow the folder's size (header scan only, lazy decode)
        small, large = (r for r in rows if r["workers"] == workers)
        assert large["rss_mb"] < small["rss_mb"] + 100, (small, large)
    benchmark.pedantic(lambda: _measure(folders[SUBSET], 0), rounds=1, iterations=1)
    record(benchmark, rows=rows, image_size=SIZE, batch=BATCH, train_step_images_per_s=train_rate)
