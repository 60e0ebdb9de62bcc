"""The FID feature pass: ``python -m ddpm_fast.fid IN --save-stats S.npz`` against pytorch-fid's own command
(``python -m pytorch_fid --save-stats IN S.npz``), the same images, the same weights, the same batch size.

Both commands run as a user runs them, in fresh processes (their start included), interleaved, on 32x32 RGB images:
pytorch-fid on a folder of PNGs (the only input it takes), ours on the same folder and on the same images as an
.npz (what ``sample`` writes). Both find the weights in the same TORCH_HOME: seeded random FID-Inception weights
under the real file name (the cost does not depend on the values); nothing is downloaded. The two statistics files
are checked to agree (relative 1e-4 on mu).

DDPM_FAST_FID_IMAGES=N sets the image count (5000 for the recorded figure; by default, a quick pass of 4 that checks
the harness), DDPM_FAST_FID_ROUNDS the interleaved rounds (default 1). extra_info carries each command's best
seconds, images per second and the ratio.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from harness import record

pytest.importorskip("pytorch_fid")  # the GPU image may lack it; CI installs it (.[test])
from ddpm_fast import fid  # noqa: E402

N = int(os.environ.get("DDPM_FAST_FID_IMAGES", "4"))
ROUNDS = int(os.environ.get("DDPM_FAST_FID_ROUNDS", "1"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("fid_bench")
    home = root / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(fid.random_weights(0), home / "hub" / "checkpoints" / fid.WEIGHTS_NAME)
    images = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    folder = root / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    npz = root / "images.npz"
    np.savez(npz, images)
    return root, str(home), str(folder), str(npz)


def test_fid_feature_pass_against_pytorch_fid(benchmark, inputs):
    root, home, folder, npz = inputs
    env = dict(os.environ, TORCH_HOME=home)
    commands = {
        "pytorch_fid (folder)": [sys.executable, "-m", "pytorch_fid", "--device", "cpu", "--batch-size", "50",
                                 "--save-stats", folder, str(root / "theirs.npz")],
        "ddpm_fast (folder)": [sys.executable, "-m", "ddpm_fast.fid", folder, "--save-stats",
                               str(root / "ours_folder.npz"), "--batch-size", "50", "--device", "cpu",
                               "--no-progress"],
        "ddpm_fast (npz)": [sys.executable, "-m", "ddpm_fast.fid", npz, "--save-stats", str(root / "ours.npz"),
                            "--batch-size", "50", "--device", "cpu", "--no-progress"],
    }
    if N < 100:  # the quick pass checks the harness: the folder reader is the tests' (tests/test_fid.py)
        del commands["ddpm_fast (folder)"]
    seconds = {name: [] for name in commands}

    def one_round():
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            run = subprocess.run(cmd, env=env, cwd=os.sep, capture_output=True, text=True)
            seconds[name].append(time.perf_counter() - t0)
            assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    with np.load(root / "theirs.npz") as a, np.load(root / "ours.npz") as b:
        np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-4, atol=1e-4 * np.abs(a["mu"]).max())
    best = {name: min(s) for name, s in seconds.items()}
    ratio = {name: best["pytorch_fid (folder)"] / s for name, s in best.items()}
    print(f"\nFID feature pass, {N} images, {ROUNDS} round(s) (CPU, {torch.get_num_threads()} threads)\n"
          "| command | seconds (best) | images/s | vs pytorch-fid |\n|---|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s:.1f} | {N / s:.2f} | {ratio[name]:.2f}x |")
    record(benchmark, images=N, rounds=ROUNDS, threads=torch.get_num_threads(),
           seconds={k: round(v, 2) for k, v in best.items()},
           images_per_second={k: round(N / v, 2) for k, v in best.items()},
           speedup_over_pytorch_fid={k: round(v, 2) for k, v in ratio.items()})
