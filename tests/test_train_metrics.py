"""Training records what it did: OUT/metrics.jsonl (continued across --resume), OUT/loss.png; --hflip."""

from __future__ import annotations

import json

import pytest
import torch

from ddpm_fast import train as train_cli
from ddpm_fast import trainer as trainer_lib
from ddpm_fast.data import load_data
from ddpm_fast.distributed import Dist
from ddpm_fast.metrics import MetricsLog, plot_loss, read_metrics

TRAIN = ["--config", "tiny", "--batch-size", "4", "--num-timesteps", "50", "--warmup", "2", "--no-progress",
         "--log-every", "1"]


def test_metrics_and_loss_plot(data, tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "5", "--out", str(out)]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "images_per_s", "time"}
        assert 0 < r["loss"] < 10 and r["grad_norm"] > 0 and r["images_per_s"] > 0
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[1]["lr"] == pytest.approx(2e-4)  # warm-up 2
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_continue_across_resume_without_duplicates(data, tmp_path):
    out = tmp_path / "run"
    args = TRAIN + ["--data", data, "--save-every", "2", "--out", str(out)]
    assert train_cli.main(args + ["--steps", "4"]) == 0
    path = out / "metrics.jsonl"
    straight = tmp_path / "straight"
    assert train_cli.main(TRAIN + ["--data", data, "--save-every", "2", "--steps", "6", "--out", str(straight)]) == 0
    # What an interrupted run may leave: a step logged after its last checkpoint, and a torn line.
    with open(path, "a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n" + '{"step": 6, "lo')
    assert train_cli.main(args + ["--steps", "6", "--resume"]) == 0
    rows = read_metrics(str(path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    want = read_metrics(str(straight / "metrics.jsonl"))
    assert [r["loss"] for r in rows] == [r["loss"] for r in want], "the resumed run logs the straight run's losses"
    assert train_cli.main(args + ["--steps", "2", "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2], "a new run starts a new file"


def test_metrics_log_unit(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path, None)
    log.append(step=1, loss=float("nan"), lr=1e-4)
    log.append(step=2, loss=0.5, lr=1e-4)
    log.append(step=3, loss=float("1e400"), lr=1e-4)
    for line in open(path):
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert read_metrics(path) == [{"step": 1, "loss": None, "lr": 1e-4, "nonfinite": ["loss"]},
                                  {"step": 2, "loss": 0.5, "lr": 1e-4},
                                  {"step": 3, "loss": None, "lr": 1e-4, "nonfinite": ["loss"]}]
    MetricsLog(path, 1)
    assert [r["step"] for r in read_metrics(path)] == [1]
    assert not plot_loss(path, str(tmp_path / "l.png")) and not (tmp_path / "l.png").exists(), "nothing to plot"


def _trainer(data, hflip, tmp_path):
    cfg = train_cli.TrainConfig(data=data, config="tiny", batch_size=64, num_timesteps=50, hflip=hflip,
                                out=str(tmp_path))
    return trainer_lib.Trainer(cfg, load_data(data, 8, 3), Dist("cpu"))


@pytest.mark.parametrize("hflip", ["on", "off"])
def test_hflip_flips_about_half_the_images(data, tmp_path, hflip):
    trainer = _trainer(data, hflip, tmp_path)
    flipped = total = 0
    for _ in range(4):
        g = torch.Generator()
        g.set_state(trainer.gens["data"].get_state())
        idx = torch.randint(0, len(trainer.data), (64,), generator=g)
        plain, _ = trainer.data.batch(idx, "cpu")
        trainer.step()
        seen = trainer._last_batch[0]
        same = (seen == plain).flatten(1).all(1)
        mirrored = (seen == plain.flip(3)).flatten(1).all(1)
        assert bool((same | mirrored).all()), "every image is itself or its mirror image"
        flipped += int((mirrored & ~same).sum())
        total += 64
    if hflip == "off":
        assert flipped == 0
    else:
        assert 0.35 < flipped / total < 0.65, flipped / total


def test_hflip_auto_is_resolved_and_saved(data, tmp_path, capsys):
    pytest.importorskip("sklearn")
    rgb, gray = tmp_path / "rgb", tmp_path / "gray"
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "1", "--out", str(rgb)]) == 0
    assert torch.load(rgb / "checkpoint.pt", weights_only=True)["args"]["hflip"] == "on"
    assert train_cli.main(["--data", "digits", "--config", "digits", "--batch-size", "2", "--steps", "1",
                           "--num-timesteps", "20", "--no-progress", "--out", str(gray)]) == 0
    assert torch.load(gray / "checkpoint.pt", weights_only=True)["args"]["hflip"] == "off"
    # A checkpoint from before --hflip existed never flipped: resuming it with flips is refused, naming it.
    state = torch.load(rgb / "checkpoint.pt", weights_only=True)
    del state["args"]["hflip"]
    torch.save(state, rgb / "checkpoint.pt")
    assert train_cli.main(TRAIN + ["--data", data, "--steps", "2", "--out", str(rgb), "--resume"]) == 2
    assert "--hflip 'off' (checkpoint) vs 'on'" in capsys.readouterr().err
    resume_unflipped = ["--data", data, "--steps", "2", "--out", str(rgb), "--resume", "--hflip", "off"]
    assert train_cli.main(TRAIN + resume_unflipped) == 0


def test_tensorboard_is_optional(data, tmp_path, capsys):
    """--tensorboard without the package: refused up front, naming it; with it: the same rows as events."""
    import importlib.util

    args = TRAIN + ["--data", data, "--steps", "3", "--out", str(tmp_path / "tb"), "--tensorboard"]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(SystemExit):
            train_cli.main(args)
        assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
        assert not (tmp_path / "tb").exists()
        return
    assert train_cli.main(args) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


def test_corrupted_metrics_rows_are_reported_with_file_and_line(tmp_path, capsys):
    """A resumed run keeps the good rows; each bad one (no integer step, not UTF-8, not JSON) is one note naming
    file and line; a torn last line (what a crash leaves) is skipped quietly."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": "x"}\n\xff\xfe junk\ngarbage\n{"step": 2, "loss": 0.4}\n'
                     b'{"step": 3, "lo')
    MetricsLog(str(path), 5)
    err = capsys.readouterr().err
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    for number, what in ((2, "no integer 'step'"), (3, "not UTF-8 text"), (4, "not a JSON object")):
        assert f"{path}:{number}: {what}; skipped" in err
    assert f"{path}:6" not in err and len(err.strip().splitlines()) == 3


def test_a_failing_side_output_is_one_warning_and_the_run_goes_on(data, tmp_path, capsys, monkeypatch):
    """loss.png a folder, samples/ a file, and a disk that fills in the middle of a metrics row: each is one
    warning naming the file, the metrics file keeps no torn line, and the run ends normally with its export."""
    import errno
    import os

    out = tmp_path / "run"
    (out / "loss.png").mkdir(parents=True)
    (out / "samples").write_bytes(b"not a folder")
    real_write = os.write

    def filling_disk(fd, data):
        if data.startswith(b'{"step": 3,'):  # the third row: half of it lands, then the disk is full
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_disk)
    args = TRAIN + ["--data", data, "--steps", "6", "--log-every", "1", "--sample-every", "2", "--out", str(out)]
    assert train_cli.main(args) == 0
    monkeypatch.undo()
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 3, err
    assert any("metrics.jsonl: cannot append (No space left on device)" in w for w in warnings)
    assert any("loss.png" in w for w in warnings) and any("samples" in w for w in warnings)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 4, 5, 6], "the failed row is cut off whole"
    assert (out / "model" / "config.json").is_file() and (out / "loss.png").is_dir()
