"""Training loses nothing: interrupts save an exact step boundary, a diverging run keeps its last good
checkpoint, bad flags and bad --out folders fail before any work, write errors are one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddpm_fast import losses as losses_lib
from ddpm_fast import train as train_cli
from ddpm_fast import trainer as trainer_lib
from ddpm_fast.fileio import TEMP_PREFIX

TRAIN = ["--config", "tiny", "--batch-size", "4", "--num-timesteps", "50", "--warmup", "2", "--no-progress"]


def _state(path):
    return torch.load(path, weights_only=True)


def _assert_same_run(a, b):
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for k, v in a["optimizer"]["state"].items():
        for name, tensor in v.items():
            assert torch.equal(tensor, b["optimizer"]["state"][k][name]), f"optimizer {k}.{name}"
    for ra, rb in zip(a["rng"], b["rng"], strict=True):
        for k in ra:
            assert torch.equal(ra[k], rb[k]), f"rng {k}"


def _temp_files(folder):
    return [n for _, _, names in os.walk(folder) for n in names if n.startswith(TEMP_PREFIX)]


# ---- interrupts ---------------------------------------------------------------------------------------

STEPS = 60  # ~12 s of training: the signal lands a second after the first save, far from the end


def _train_process(args, cwd):
    # cwd outside the source tree: the installed package (with its compiled extension) is what runs.
    cmd = [sys.executable, "-m", "ddpm_fast.train", *TRAIN, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run, in a process like the interrupted one (same thread count)."""
    out = tmp_path_factory.mktemp("straight")
    proc = _train_process(["--data", data, "--steps", str(STEPS), "--save-every", "5", "--out", str(out)], out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return _state(out / "checkpoint.pt")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_then_resume_is_bit_exact(data, straight, tmp_path, signum):
    """A real signal to a training process: it finishes the step, saves that boundary, exits 128+signum;
    --resume then ends bit for bit where the uninterrupted run ends."""
    out = tmp_path / "run"
    args = ["--data", data, "--steps", str(STEPS), "--save-every", "5", "--out", str(out)]
    proc = _train_process(args, tmp_path)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists():  # the first periodic save: the loop is running
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    name = signal.Signals(signum).name
    assert f"{name}: finishing the current step" in err and "continue with --resume" in err
    stopped = _state(out / "checkpoint.pt")["step"]
    assert 5 <= stopped < STEPS, "the signal must land mid-run for this test to mean anything"
    assert not _temp_files(out) and not (out / "model").exists()
    proc = _train_process(args + ["--resume"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    _assert_same_run(straight, _state(out / "checkpoint.pt"))


def _image_folder(root, n=24):
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return str(root)


def test_workers_are_capped_by_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert trainer_lib.worker_count(-1, folder=True) == (1, [])
    assert trainer_lib.worker_count(-1, folder=False) == (0, [])
    assert trainer_lib.worker_count(2, folder=True) == (2, [])
    n, notes = trainer_lib.worker_count(9, folder=True)
    assert n == 2 and notes == ["--workers 9: this machine has 2 CPU cores; using 2 workers"]
    assert trainer_lib.max_workers_accepted() == 16
    assert train_cli.TrainConfig(data="digits", workers=16).errors() == []
    assert "far more than" in train_cli.TrainConfig(data="digits", workers=17).errors()[0]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_process_group_signal_with_workers_ends_like_one_to_the_main_process(tmp_path, signum):
    """What `timeout`, job schedulers (SIGTERM) and Ctrl-C (SIGINT) do: signal the whole process group, workers
    included. One notice, the step boundary saved, exit 128+signum, no worker traceback, and --resume goes on."""
    folder = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    args = ["--data", folder, "--workers", "2", "--steps", "100000", "--save-every", "5", "--out", str(out)]
    cmd = [sys.executable, "-m", "ddpm_fast.train", *TRAIN, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)  # its own process group, as a shell job has
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err.count(f"{name}: finishing the current step") == 1, err[-3000:]
    assert "Traceback" not in err and "worker" not in err.lower(), err[-3000:]
    stopped = _state(out / "checkpoint.pt")["step"]
    assert f"{name} at step {stopped}: checkpoint saved" in err
    resume = ["--data", folder, "--workers", "2", "--steps", str(stopped + 2), "--out", str(out), "--resume"]
    assert train_cli.main(TRAIN + resume) == 0


def _signalling_save(monkeypatch, at_call: int, signals: list[int]):
    """torch.save that, on its ``at_call``-th call, sends ``signals`` to this process while it writes."""
    real = torch.save
    calls = []

    def save(obj, path, *a, **kw):
        calls.append(obj["step"])
        if len(calls) == at_call:
            with open(path, "wb") as f:
                f.write(b"partial")  # a half-written temp file, as a killed write would leave
            for s in signals:
                os.kill(os.getpid(), s)
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_second_signal_during_the_save_changes_nothing(data, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    args = TRAIN + ["--data", data, "--save-every", "2", "--out", str(out)]
    calls = _signalling_save(monkeypatch, 1, [signal.SIGINT, signal.SIGTERM])
    assert train_cli.main(args + ["--steps", "50"]) == 128 + signal.SIGINT
    err = capfd.readouterr().err
    assert "SIGINT: finishing the current step" in err and "SIGTERM: already stopping" in err
    assert calls == [2, 3], "the save under way completes; the stop comes at the next step boundary"
    assert _state(out / "checkpoint.pt")["step"] == 3 and not _temp_files(out)
    monkeypatch.undo()
    assert train_cli.main(args + ["--steps", "6", "--resume"]) == 0
    assert train_cli.main(args + ["--steps", "6", "--out", str(tmp_path / "straight")]) == 0
    _assert_same_run(_state(tmp_path / "straight" / "checkpoint.pt"), _state(out / "checkpoint.pt"))


def test_third_signal_aborts_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    _signalling_save(monkeypatch, 2, [signal.SIGINT] * 3)
    assert train_cli.main(TRAIN + ["--data", data, "--save-every", "2", "--steps", "50", "--out", str(out)]) == 130
    assert "aborted" in capfd.readouterr().err
    assert _state(out / "checkpoint.pt")["step"] == 2, "the step-4 save was aborted; step 2 stays intact"
    assert not _temp_files(out)
    assert signal.getsignal(signal.SIGINT) is handler, "the handlers are restored"


def test_stale_temp_files_are_removed(data, tmp_path, capfd):
    out = tmp_path / "run"
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "2", "--out", str(out)]) == 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writer = f"{socket.gethostname()}~{int(gone.stdout)}"  # a killed writer of ours: its files are stale
    (out / f"{TEMP_PREFIX}{writer}~abc123~checkpoint.pt").write_bytes(b"partial")
    (out / "model" / f"{TEMP_PREFIX}{writer}~xyz~{trainer_lib.CONFIG_NAME}").write_bytes(b"{")
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert "removed 2 temporary file(s)" in capfd.readouterr().err
    assert not _temp_files(out)


# ---- divergence ---------------------------------------------------------------------------------------


def test_diverging_run_saves_nothing_bad(data, tmp_path, capfd):
    """lr 1e6: the first update blows the weights up (loss ~1e14 one step later). A save every step must
    not write them: nothing is saved, the error says so, exit 2."""
    out = tmp_path / "run"
    code = train_cli.main(TRAIN + ["--data", data, "--warmup", "0", "--lr", "1e6", "--save-every", "1", "--steps", "20",
                                   "--out", str(out)])
    assert code == 2
    err = capfd.readouterr().err
    assert "diverged" in err and "no checkpoint was written" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "model").exists()


def test_divergence_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capfd):
    """The loss turns NaN at step 5: checkpoint.pt stays the step-4 state, equal to a healthy run's."""
    real = losses_lib.training_loss  # what the Trainer's default loss object (losses.NoiseLoss) computes
    calls = []

    def loss_turning_nan(*a, **kw):
        loss = real(*a, **kw)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) >= 5:
                return loss * float("nan")
        return loss

    args = TRAIN + ["--data", data, "--save-every", "2", "--steps", "8"]
    assert train_cli.main(args + ["--steps", "4", "--out", str(tmp_path / "healthy")]) == 0
    monkeypatch.setattr(losses_lib, "training_loss", loss_turning_nan)
    out = tmp_path / "run"
    assert train_cli.main(args + ["--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert "diverged at step 5" in err and "checkpoint.pt (step 4) is the last good state and was kept" in err
    _assert_same_run(_state(tmp_path / "healthy" / "checkpoint.pt"), _state(out / "checkpoint.pt"))
    assert not (out / "model").exists()


# ---- up-front checks ----------------------------------------------------------------------------------


def test_bad_out_fails_before_any_work(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # --data does not exist either: the --out error comes first, so nothing was loaded or trained.
    for out in (blocker, blocker / "sub"):
        assert train_cli.main(TRAIN + ["--data", str(tmp_path / "nope"), "--steps", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and ("not a folder" in err or "cannot write there" in err), err


def test_out_holding_another_run_needs_resume_or_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "2", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "1", "--out", str(out)]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert _state(out / "checkpoint.pt")["step"] == 1
    with pytest.raises(SystemExit) as exc:
        train_cli.main(TRAIN + ["--data", data, "--out", str(out), "--overwrite", "--resume"])
    assert exc.value.code == 2


def test_write_errors_are_one_line_and_keep_the_old_checkpoint(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = TRAIN + ["--data", data, "--save-every", "2", "--out", str(out)]
    assert train_cli.main(args + ["--steps", "2"]) == 0
    before = (out / "checkpoint.pt").read_bytes()

    def full_disk(obj, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    assert train_cli.main(args + ["--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.pt: cannot write (PytorchStreamWriter failed" in err
    assert (out / "checkpoint.pt").read_bytes() == before and not _temp_files(out)


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "--log-every must be positive"),
    (["--grad-clip", "nan"], "--grad-clip must be finite and >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--warmup", "-5"], "--warmup must be >= 0"),
    (["--lr", "inf"], "--lr must be positive and finite"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**50)"),
    (["--device", "bogus"], "--device 'bogus': not a device"),
    (["--workers", "100000"], "--workers 100000 is far more than this machine's"),
])
def test_bad_flags_are_refused_up_front(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--data", "digits", "--out", str(tmp_path / "o"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_run_defining_flags_come_from_the_config():
    run = set(train_cli.TrainConfig.run_defining())
    assert {"data", "lr", "seed", "batch_size", "schedule", "grad_clip"} <= run
    assert not run & {"steps", "out", "resume", "save_every", "device", "no_progress", "overwrite"}
    parser = train_cli.build_parser()
    assert vars(parser.parse_args(["--data", "x"])) == vars(train_cli.TrainConfig(data="x"))


@pytest.mark.slow
def test_cli_failures_as_processes(data, tmp_path):
    """The exit code and the files are the point: run the real commands."""
    def run(module, *args):
        return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)  # the installed package

    out = tmp_path / "o"
    res = run("ddpm_fast.train", "--data", data, "--log-every", "0", "--out", str(out))
    assert res.returncode == 2 and "--log-every must be positive" in res.stderr and not out.exists()
    res = run("ddpm_fast.sample", "--sampler", "ddpm", "--eta", "0.5", "--out", str(out))
    assert res.returncode == 2 and "--eta applies to --sampler ddim only" in res.stderr and not out.exists()
    res = run("ddpm_fast.train", *TRAIN, "--data", data, "--warmup", "0", "--lr", "1e6", "--save-every", "1",
              "--steps", "20", "--out", str(out))
    assert res.returncode == 2 and "no checkpoint was written" in res.stderr
    assert res.stderr.strip().count("\n") == 0, "one line"
    assert not (out / "checkpoint.pt").exists() and not (out / "model").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run("ddpm_fast.sample", "--out", str(blocker))
    assert res.returncode == 2 and "exists and is not a folder" in res.stderr
