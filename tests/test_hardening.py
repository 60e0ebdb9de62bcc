"""Nonsense is refused before work, naming it: scheduler configs that change the process in ways the engine does
not implement, runs whose only step is t=0, absurd guidance, float labels, a non-finite x_T, edited checkpoints.
Each case was accepted silently (exit 0, a wrong result) before."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

from ddpm_fast import DDIMSampler, NoiseSchedule, RunOptions, UNet, UNetConfig
from ddpm_fast import sample as sample_cli
from ddpm_fast import train as train_cli
from ddpm_fast.checkpoint import CheckpointError, load_schedule, pickled_names, read_torch_file, save_pretrained
from ddpm_fast.fileio import atomic_write_json
from ddpm_fast.schedule import space_timesteps


def test_scheduler_config_trained_betas_are_honoured():
    betas = torch.linspace(1e-4, 0.05, 30, dtype=torch.float64)
    sched = NoiseSchedule.from_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 30,
                                       "trained_betas": betas.tolist(), "beta_schedule": "linear"})
    assert torch.equal(sched.betas, betas)
    assert torch.equal(NoiseSchedule.from_config(sched.to_config()).betas, betas)  # and written back
    with pytest.raises(ValueError, match="trained_betas holds 30 betas, num_train_timesteps is 1000"):
        NoiseSchedule.from_config({"trained_betas": betas.tolist(), "num_train_timesteps": 1000})


@pytest.mark.parametrize("cfg, message", [
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr: zero-terminal-SNR rescaling of the betas is not"),
    ({"thresholding": True}, "thresholding: dynamic thresholding is not implemented"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "_class_name 'FlowMatchEulerDiscreteScheduler' is not"),
])
def test_scheduler_config_options_not_implemented_are_refused(tmp_path, cfg, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_config({"num_train_timesteps": 1000, **cfg})
    # From a model folder: the error names the file.
    save_pretrained(UNet(UNetConfig.from_name("tiny")), tmp_path)
    atomic_write_json(str(tmp_path / "scheduler_config.json"), {"num_train_timesteps": 1000, **cfg})
    with pytest.raises(CheckpointError, match="scheduler_config.json: "):
        load_schedule(str(tmp_path))
    assert NoiseSchedule.from_config({"num_train_timesteps": 1000, **{k: False for k in cfg if k != "_class_name"}})


def test_a_run_whose_only_step_is_t0_is_refused(tmp_path, capsys):
    for spacing in ("leading", "linspace"):
        with pytest.raises(ValueError, match="lands on t=0 only"):
            space_timesteps(1000, 1, spacing)
        with pytest.raises(ValueError, match="lands on t=0 only"):
            DDIMSampler(NoiseSchedule.linear(1000), 1, spacing=spacing)
    assert space_timesteps(1000, 1, "trailing") == [999]
    assert DDIMSampler(NoiseSchedule.linear(1000), 1, spacing="trailing").timesteps.tolist() == [999]
    for sampler in ("ddim", "ddpm"):
        assert sample_cli.main(["--sampler", sampler, "--steps", "1", "--allow-few-steps", "--out",
                                str(tmp_path / sampler),
                                "--no-progress"]) == 2
        assert "lands on t=0 only" in capsys.readouterr().err


def test_absurd_guidance_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"guidance_scale must be finite, within \+-100"):
        RunOptions(guidance_scale=1e30)
    assert RunOptions(guidance_scale=-3.0).guidance_scale == -3.0
    with pytest.raises(SystemExit) as exc:
        sample_cli.main(["--guidance-scale", "1e30", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--guidance-scale must be finite, within +-100" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_float_labels_and_non_finite_x_T_are_refused():
    model = randomize_(UNet(UNetConfig.from_name("digits")).eval(), 0.02)
    sampler = DDIMSampler(NoiseSchedule.linear(100), 2)
    with pytest.raises(ValueError, match="class_labels must be integers, got torch.float32"):
        sampler.plan(model, (2, 1, 16, 16), seed=0, class_labels=torch.tensor([1.5, 2.0]))
    x_T = torch.randn(2, 1, 16, 16)
    x_T[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="x_T holds non-finite values"):
        sampler.plan(model, (2, 1, 16, 16), seed=0, class_labels=[1, 2], x_T=x_T)


@pytest.fixture(scope="module")
def trained_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["--config", "tiny", "--batch-size", "4", "--num-timesteps", "50", "--warmup", "2", "--no-progress",
            "--data", data, "--out", str(out)]
    assert train_cli.main(args + ["--steps", "2"]) == 0
    return out, args


@pytest.mark.parametrize("field, value, message", [
    ("step", -5, "its 'step' is -5, not a step count"),
    ("step", 2.5, "its 'step' is 2.5, not a step count"),
    ("args", ["--lr", "1"], "its 'args' is a list, not the saved run's flags"),
    ("rng", [{"torch": torch.zeros(3, dtype=torch.uint8)}], "broken generator state"),
    ("rng", "seed", "broken generator state (a str)"),
])
def test_edited_checkpoint_fields_are_refused(trained_run, tmp_path, capsys, field, value, message):
    import shutil

    src, args = trained_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    args = [a if a != str(src) else str(out) for a in args]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state[field] = value
    torch.save(state, out / "checkpoint.pt")
    assert train_cli.main(args + ["--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unknown_scheduler_in_a_model_folder_fails_the_cli(tmp_path, capsys):
    path = tmp_path / "model"
    save_pretrained(UNet(UNetConfig.from_name("tiny")), path, schedule=NoiseSchedule.linear(20))
    atomic_write_json(str(path / "scheduler_config.json"), {"_class_name": "DDPMScheduler", "num_train_timesteps": 20,
                                                            "rescale_betas_zero_snr": True})
    assert sample_cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "rescale_betas_zero_snr" in capsys.readouterr().err


def test_outputs_are_atomic_and_the_npz_is_written_last(tmp_path, capsys, monkeypatch):
    """A grid that cannot be written (a full disk) leaves the old grid.png as it was, names the file, and writes
    no .npz; a grid.png that is a folder is refused before any work."""
    import errno

    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"the previous grid")

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    args = ["--num-samples", "2", "--steps", "2", "--allow-few-steps", "--no-progress", "--out", str(out)]
    assert sample_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "grid.png" in err and "No space left" in err and len(err.strip().splitlines()) == 1
    assert (out / "grid.png").read_bytes() == b"the previous grid"
    assert not list(out.glob("*.npz"))
    monkeypatch.undo()

    (out / "grid.png").unlink()
    (out / "grid.png").mkdir()
    assert sample_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "grid.png: exists and is not a file" in err
    assert not list(out.glob("*.npz"))
    (out / "grid.png").rmdir()
    assert sample_cli.main(args) == 0
    assert (out / "grid.png").is_file() and len(list(out.glob("*.npz"))) == 1


def test_a_pickle_is_refused_without_advising_to_run_it(tmp_path):
    import argparse

    from ddpm_fast import load_pretrained

    path = tmp_path / "evil.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path, config=UNetConfig.from_name("tiny"))
    message = str(info.value)
    assert "evil.pt" in message and "it was not loaded" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_checkpoint_run_folder_samples_the_newest_state(data, tmp_path, capsys):
    """A run resumed after its export and stopped again has a newer checkpoint.pt than model/: --checkpoint RUN
    samples that one, and says which file it used."""
    import os
    import shutil

    out = tmp_path / "run"
    args = ["--config", "tiny", "--batch-size", "4", "--num-timesteps", "50", "--warmup", "0", "--no-progress",
            "--lr", "0.01", "--ema-decay", "0", "--data", data, "--out", str(out)]  # steps that change the images
    assert train_cli.main(args + ["--steps", "2"]) == 0
    export = out / "model"
    old_export = tmp_path / "model_at_step_2"
    shutil.copytree(export, old_export)
    assert train_cli.main(args + ["--steps", "4", "--resume"]) == 0  # now model/ and checkpoint.pt are step 4
    shutil.rmtree(export)
    shutil.copytree(old_export, export)  # model/ back at step 2, as a run interrupted after resuming leaves it
    stamp = os.path.getmtime(export / "diffusion_pytorch_model.safetensors")
    os.utime(out / "checkpoint.pt", (stamp + 10, stamp + 10))
    capsys.readouterr()
    common = ["--num-samples", "2", "--steps", "2", "--allow-few-steps", "--no-progress"]
    assert sample_cli.main(["--checkpoint", str(out), "--out", str(tmp_path / "a")] + common) == 0
    assert f"sampling {out / 'checkpoint.pt'} (its newest state)" in capsys.readouterr().err
    assert sample_cli.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "b")] + common) == 0
    assert sample_cli.main(["--checkpoint", str(export), "--out", str(tmp_path / "c")] + common) == 0
    import numpy as np

    def images(folder):
        with np.load(tmp_path / folder / "samples_2x8x8x3.npz") as f:
            return f["arr_0"]

    assert np.array_equal(images("a"), images("b")) and not np.array_equal(images("a"), images("c"))
    os.utime(out / "checkpoint.pt", (stamp - 10, stamp - 10))  # an ordinary finished run: the export is newest
    assert sample_cli.main(["--checkpoint", str(out), "--out", str(tmp_path / "d")] + common) == 0
    assert f"sampling {export} (its newest state)" in capsys.readouterr().err


def test_a_decompression_bomb_is_one_line(tmp_path, capsys):
    """A 100-byte PNG whose header claims 60000x60000: exit 2, one line naming the file, nothing decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    folder = tmp_path / "images"
    folder.mkdir()
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                                      + chunk(b"IEND", b""))
    args = ["--config", "tiny", "--batch-size", "4", "--steps", "1", "--no-progress", "--data", str(folder),
            "--out", str(tmp_path / "o")]
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "bomb.png: its header claims 3,600,000,000 pixels, over the limit of 67,108,864 (--max-image-pixels)" \
        in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_huge_image_is_refused_over_the_limit_and_decoded_once_under_it(tmp_path, capsys, monkeypatch, fmt):
    """2400 x 2400 (5.8 megapixels): over --max-image-pixels, one line naming the file and the flag; under it,
    reduced while decoding (no full-size float copy: numpy's peak stays far below one full-size plane), kept,
    and not decoded again at the next draws; the result is the full-size path's, up to resampling."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from ddpm_fast import data as data_mod

    folder = tmp_path / "images"
    folder.mkdir()
    yy, xx = np.mgrid[0:2400, 0:2400]
    rgb = np.stack([xx * 255 // 2399, yy * 255 // 2399, (xx + yy) * 255 // 4798], axis=-1).astype(np.uint8)
    path = folder / f"big.{fmt.lower()}"
    Image.fromarray(rgb).save(path, format=fmt)
    args = ["--config", "tiny", "--batch-size", "4", "--steps", "1", "--no-progress", "--data", str(folder),
            "--out", str(tmp_path / "o"), "--max-image-pixels", "1000000"]
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"big.{fmt.lower()}: its header claims 5,760,000 pixels" in err, err
    assert "over the limit of 1,000,000 (--max-image-pixels)" in err
    args[-1] = "5000000"  # between the limit and twice it (Pillow's own refusal starts at twice): ours refuses
    assert train_cli.main(args) == 2
    assert "5,760,000 pixels (2400x2400), over the limit of 5,000,000" in capsys.readouterr().err

    decodes = []
    real = data_mod._read_image
    monkeypatch.setattr(data_mod, "_read_image", lambda *a, **k: decodes.append(a[0]) or real(*a, **k))
    dataset = data_mod.FolderDataset(str(folder), 3, 16)
    tracemalloc.start()
    first = dataset.get(torch.tensor([0, 0]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2400 * 2400 * 4 // 4, f"numpy peaked at {peak / 2**20:.1f} MB: a full-size plane was made"
    again = dataset.get(torch.tensor([0]))
    assert len(decodes) == 1 and torch.equal(first[0], again[0]) and torch.equal(first[0], first[1])
    full = data_mod.center_crop_resize(rgb, 16)  # the path a small image takes, on the undecoded pixels
    diff = np.abs(first[0].numpy().astype(int) - full.astype(int))
    # One box resize instead of seven floor-halvings: the same geometry up to the halvings' own unevenness.
    assert diff.max() <= 8 and diff.mean() < 3, (diff.max(), diff.mean())  # the ramp climbs 16 levels a pixel


# ---- own only what we made ----------------------------------------------------------------------------


def _holder(folder):
    """A real process holding ``folder`` as its run folder until it is killed."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom ddpm_fast.fileio import RunFolder\nRunFolder(sys.argv[1]).__enter__()\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_temp_files_are_removed_only_when_ours_and_their_writer_is_gone(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from ddpm_fast.fileio import TEMP_PREFIX

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = socket.gethostname()
        files = {
            ".tmp-notes.txt": b"the user's own notes",  # not ours: kept
            f"{TEMP_PREFIX}{host}~{dead_pid}~abc123~grid.png": b"half a grid",  # ours, writer gone: removed
            f"{TEMP_PREFIX}{host}~{live.pid}~def456~checkpoint.pt": b"another writer's",  # writer alive: kept
            f"{TEMP_PREFIX}elsewhere~{dead_pid}~ghi789~x.npz": b"another machine's",  # cannot tell: kept
        }
        for name, data in files.items():
            (out / name).write_bytes(data)
        assert sample_cli.main(["--num-samples", "1", "--steps", "2", "--allow-few-steps", "--no-progress", "--out",
                                str(out)]) == 0
        assert "removed 1 temporary file(s)" in capsys.readouterr().err
        left = {p.name for p in out.iterdir()}
        assert left >= set(files) - {f"{TEMP_PREFIX}{host}~{dead_pid}~abc123~grid.png"}
        assert f"{TEMP_PREFIX}{host}~{dead_pid}~abc123~grid.png" not in left
        assert (out / ".tmp-notes.txt").read_bytes() == b"the user's own notes"
        assert not any(n.startswith(".ddpm_fast.lock") for n in left), "the lock goes with its run"
    finally:
        live.kill()
        live.wait()


def test_a_folder_another_process_writes_is_refused(data, tmp_path, capsys):
    """A real process holds RUN (as a training run does): sample --out RUN, --out RUN/sub and train --out RUN are
    one line naming the holder, and nothing in RUN is touched; once the holder is gone (killed: no clean exit)
    the folder is free again."""
    import signal

    run = tmp_path / "run"
    proc = _holder(run)
    try:
        theirs = run / ".ddpm_fast-tmp~host~1~x~checkpoint.pt"
        theirs.write_bytes(b"being written")
        for out in (run, run / "sub"):
            assert sample_cli.main(["--num-samples", "1", "--steps", "2", "--allow-few-steps", "--no-progress",
                                    "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1, err
            assert "another ddpm_fast process is writing" in err and f"pid {proc.pid}" in err
        assert train_cli.main(["--config", "tiny", "--data", data, "--steps", "1", "--no-progress",
                               "--out", str(run)]) == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        assert theirs.read_bytes() == b"being written" and not (run / "sub").exists()
        assert {p.name for p in run.iterdir()} == {".ddpm_fast.lock", theirs.name}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sample_cli.main(["--num-samples", "1", "--steps", "2", "--allow-few-steps", "--no-progress", "--out",
                            str(run)]) == 0


def test_a_failed_run_leaves_no_empty_out(tmp_path, capsys):
    """The flags pass, the run fails (a label the model does not have): the --out it made is gone, a --out that
    existed stays."""
    made = tmp_path / "a" / "b"
    assert sample_cli.main(["--class-label", "99", "--no-progress", "--out", str(made)]) == 2
    assert "--class-label must be in [0, 9]" in capsys.readouterr().err
    assert not made.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert sample_cli.main(["--class-label", "99", "--no-progress", "--out", str(kept)]) == 2
    assert kept.is_dir() and not list(kept.iterdir())


# ---- sizes are checked before anything is allocated ---------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    ({"block_out_channels": [10**9, 2 * 10**9]}, "block_out_channels [1000000000, 2000000000] with layers_per_block 1 "
                                                 "make about"),
    ({"layers_per_block": 100000}, "block_out_channels [16, 32] with layers_per_block 100000 make about"),
    ({"sample_size": 65536}, "sample_size 65536 needs about"),
    ({"block_out_channels": []}, "block_out_channels must be a non-empty list of positive integers, got []"),
    ({"block_out_channels": [0, 0]}, "block_out_channels must be a non-empty list of positive integers, got [0, 0]"),
    ({"sample_size": "x"}, "sample_size must be an integer, got 'x'"),
])
def test_config_sizes_are_checked_before_allocation(tmp_path, capsys, monkeypatch, edit, message):
    """An edited config.json: one line naming the field, exit 2, before any weight is allocated (the machine's
    memory is pinned to 16 GiB so the verdict does not depend on the machine running the test)."""
    import json

    from ddpm_fast import base

    monkeypatch.setattr(base, "machine_memory_bytes", lambda: 16 << 30)
    path = tmp_path / "model"
    save_pretrained(UNet(UNetConfig.from_name("tiny")), path, schedule=NoiseSchedule.linear(20))
    cfg = json.loads((path / "config.json").read_text())
    atomic_write_json(str(path / "config.json"), {**cfg, **edit})
    allocated = []
    monkeypatch.setattr(UNet, "__init__", lambda *a, **k: allocated.append(1) or pytest.fail("a UNet was built"))
    assert sample_cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config.json: {message}" in err, err
    assert not allocated and not (tmp_path / "o").exists()


def test_model_budget_by_api_and_flags_and_timesteps(monkeypatch):
    from ddpm_fast import base
    from ddpm_fast.adm import ADMConfig, ADMUNet
    from ddpm_fast.openai import config_from_flags

    monkeypatch.setattr(base, "machine_memory_bytes", lambda: 16 << 30)
    with pytest.raises(ValueError, match=r"UNet: ch 4096 with ch_mult \[1, 2\] with num_res_blocks 1 make about"):
        UNet(UNetConfig.from_name("tiny", ch=4096, num_groups=4))
    with pytest.raises(ValueError, match=r"ADMUNet: image_size 65536 needs about"):
        ADMUNet(ADMConfig(image_size=65536, model_channels=32, channel_mult=(1, 2), attention_ds=(2,)))
    with pytest.raises(ValueError, match=r"--num_channels 100000 with .* make about"):
        config_from_flags("--num_channels 100000 --image_size 64", "guided-diffusion")
    for n in (0, 10**9, 2.0):
        with pytest.raises(ValueError, match="num_train_timesteps must be a positive int of at most 1,000,000"):
            NoiseSchedule.linear(n)
    # The real presets fit (the estimate is within a few percent of the true counts).
    for name in ("cifar10", "celebahq256"):
        cfg = UNetConfig.from_name(name)
        est, _ = base.unet_cost(cfg.resolutions, [cfg.ch * m for m in cfg.ch_mult], cfg.num_res_blocks,
                                [r in cfg.attn_resolutions for r in cfg.resolutions], cfg.temb_dim)
        with torch.device("meta"):
            real = sum(p.numel() for p in UNet(cfg).parameters())
        assert abs(est / real - 1) < 0.05 and cfg.budget_problem() is None


def test_a_file_system_without_locks_leaves_the_folder_unlocked(tmp_path, monkeypatch):
    """Some network mounts refuse flock (ENOLCK): the run goes on, unlocked, rather than failing."""
    import errno
    import fcntl

    from ddpm_fast.fileio import RunFolder

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunFolder(tmp_path / "out") as folder:
        assert (tmp_path / "out").is_dir() and folder.removed == 0
    assert not (tmp_path / "out" / ".ddpm_fast.lock").exists()


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this would have run",))


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_pickle_with_code_says_so_whatever_torchs_wording(tmp_path, kind):
    """Classified from the pickle's own opcodes (pickletools), never by running it or by matching torch's text."""
    import pickle

    path = tmp_path / "evil.pt"
    if kind == "torch.save":
        torch.save({"weight": torch.ones(2), "x": _RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=4))
    with pytest.raises(CheckpointError) as info:
        read_torch_file(str(path))
    message = str(info.value)
    assert "holds pickled Python objects besides tensors (posix.system" in message or "(nt.system" in message
    assert "would run code" in message and "weights_only=False" not in message and "\n" not in message


def test_a_plain_pickle_is_named_as_one(tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"x": 1, "y": [1.0, 2.0]}, protocol=4))
    with pytest.raises(CheckpointError, match="a Python pickle, not a torch checkpoint"):
        read_torch_file(str(path))
    names = pickled_names(str(path))
    assert names == []
    torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    assert all(n.startswith(("torch.", "collections.")) for n in pickled_names(str(tmp_path / "ok.pt")))
    assert read_torch_file(str(tmp_path / "ok.pt"))["w"].tolist() == [1.0]


def test_errors_name_what_they_refer_to(tmp_path, capsys):
    """An unbalanced quote in --openai-flags, and a lock file that is a folder, each name the thing in one line."""
    from ddpm_fast.openai import parse_flags

    with pytest.raises(ValueError, match=r"openai flags .*unbalanced quote"):
        parse_flags("--image_size '64")
    out = tmp_path / "run"
    (out / ".ddpm_fast.lock").mkdir(parents=True)
    assert sample_cli.main(["--num-samples", "1", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ".ddpm_fast.lock: the run folder's lock file is a folder" in err


def test_a_flags_dict_has_its_values_type_checked():
    """load_openai's flags dict: a value of the wrong type is named with its flag, not carried into the model."""
    from ddpm_fast.openai import config_from_flags, parse_flags

    for flags, name in (({"num_channels": "64x"}, "num_channels"), ({"num_channels": 64.5}, "num_channels"),
                        ({"learn_sigma": 1}, "learn_sigma"), ({"num_res_blocks": True}, "num_res_blocks"),
                        ({"noise_schedule": 3}, "noise_schedule"), ({"dropout": "0.1.2"}, "dropout"),
                        ({"attention_resolutions": [16, "x"]}, "attention_resolutions")):
        with pytest.raises((TypeError, ValueError), match=f"--{name}: expected a"):
            parse_flags(flags)
    v = parse_flags({"--num_channels": 64, "dropout": 0, "learn_sigma": True, "attention_resolutions": (16, 8)})
    assert (v["num_channels"], v["dropout"], v["learn_sigma"], v["attention_resolutions"]) == (64, 0.0, True, "16,8")
    assert type(v["dropout"]) is float
    assert config_from_flags({"image_size": 32, "num_channels": 32, "channel_mult": [1, 2],
                              "attention_resolutions": [2]})[0].channel_mult == (1, 2)


@pytest.mark.parametrize("args", [["--sampler", "plms", "--steps", "1"], ["--sampler", "heun", "--steps", "1"],
                                  ["--sampler", "ddim", "--timestep-respacing", "1"],
                                  ["--sampler", "ddpm", "--timestep-respacing", "1"]])
def test_a_run_whose_only_evaluation_is_at_t0_is_refused(tmp_path, capsys, args):
    """The plan refuses it, whatever the sampler and however its timesteps were chosen."""
    out = tmp_path / "out"
    assert sample_cli.main(args + ["--allow-few-steps", "--num-samples", "2", "--no-progress", "--out", str(out)]) == 2
    assert "its only model evaluation is at t = 0" in capsys.readouterr().err
    assert not list(out.glob("*.npz")) and not (out / "grid.png").exists()
    with pytest.raises(ValueError, match="only model evaluation is at t = 0"):
        DDIMSampler(NoiseSchedule.linear(100), timesteps=[0]).plan(UNet(UNetConfig.from_name("tiny")), (1, 3, 8, 8))


def test_a_short_unclipped_run_that_blows_up_blames_its_step_count_first(tmp_path, capsys):
    """Heun at 2 steps overshoots on the embedded model: the step count is named first, the weights after it; a
    long run's blow-up (here: a broken model) names the weights first."""
    out = tmp_path / "out"
    assert sample_cli.main(["--sampler", "heun", "--steps", "2", "--allow-few-steps", "--num-samples", "4",
                            "--no-progress",
                            "--out", str(out)]) == 2
    err = capsys.readouterr().err
    causes = err.split("most likely first: ")[1]
    assert causes.startswith("too few steps for heun, which does not clip its x0 (3 model evaluations)")
    assert causes.index("too few steps") < causes.index("the checkpoint's weights") and not out.exists()
    model = UNet(UNetConfig.from_name("tiny"))
    with torch.no_grad():
        model.conv_out.weight.fill_(3e38)
        model.conv_in.bias.fill_(1.0)
    save_pretrained(model, tmp_path / "inf_model", schedule=NoiseSchedule.linear(20))
    assert sample_cli.main(["--checkpoint", str(tmp_path / "inf_model"), "--sampler", "ddim", "--steps", "12",
                            "--num-samples", "2", "--no-progress", "--out", str(out)]) == 2
    assert capsys.readouterr().err.split("most likely first: ")[1].startswith("the checkpoint's weights")


@pytest.mark.parametrize("sampler, minimum", [("unipc", 3), ("dpm++", 3), ("ddim", 2), ("heun", 6), ("plms", 3)])
def test_steps_below_a_samplers_useful_minimum_are_refused_unless_forced(tmp_path, capsys, sampler, minimum):
    """The default sampler at --steps 1 wrote a grid of saturated noise with exit 0 (RESULTS.md, 'Few steps')."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        sample_cli.main(["--sampler", sampler, "--steps", str(minimum - 1), "--out", str(out)])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"useful minimum of {minimum} steps" in err and "--allow-few-steps" in err
    assert sample_cli.main(["--sampler", sampler, "--steps", str(minimum - 1), "--allow-few-steps", "--num-samples",
                            "2", "--no-progress", "--out", str(out)]) in (0, 2)  # forced: it runs (or blows up)
    assert sample_cli.main(["--sampler", sampler, "--steps", str(minimum), "--num-samples", "2", "--no-progress",
                            "--out", str(out)]) == 0
