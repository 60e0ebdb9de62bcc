"""Progressive distillation (ddpm_fast.distill): the target and the loss against float64 restatements of Salimans &
Ho's formulas on fixed draws, a short round that brings the student closer to its teacher, exact resume after a
signal, and one-line errors that write nothing."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from conftest import randomize_

from ddpm_fast import NoiseSchedule, UNet, UNetConfig, save_pretrained
from ddpm_fast import distill as distill_cli
from ddpm_fast import trainer as trainer_lib
from ddpm_fast.distillation import ProgressiveLoss, round_schedule, student_schedule
from ddpm_fast.schedule import space_timesteps

T = 50


def _model(prediction_type="epsilon", seed=0, classes=None):
    torch.manual_seed(seed)
    model = randomize_(UNet(UNetConfig.from_name("tiny", num_classes=classes, dropout=0.0)), 0.05).eval()
    schedule = NoiseSchedule.linear(T)
    schedule.prediction_type = prediction_type
    return model, schedule


def _ab(schedule, t):
    """(alpha, sigma) at timestep t (float64), or at the clean end for t < 0."""
    if t < 0:
        return 1.0, 0.0
    acp = float(schedule.alphas_cumprod.double()[t])
    return acp**0.5, (1 - acp) ** 0.5


def _x0_of(model, schedule, z, t):
    """The teacher's x_0 in float64 from its output at (z, t), by its prediction type."""
    out = model(z.float(), torch.full((z.shape[0],), t), None).double()
    a, s = _ab(schedule, t)
    return (a * z - s * out) if schedule.prediction_type == "v_prediction" else (z - s * out) / a


def _restated_target(model, schedule, z, t, t_mid, t_end):
    """Two deterministic DDIM steps t -> t_mid -> t_end, then x~ (Salimans & Ho, Algorithm 2), in float64."""
    x = z
    for frm, to in ((t, t_mid), (t_mid, t_end)):
        a, s = _ab(schedule, frm)
        a2, s2 = _ab(schedule, to)
        x0 = _x0_of(model, schedule, x, frm)
        eps = (x - a * x0) / s
        x = a2 * x0 + s2 * eps
    a, s = _ab(schedule, t)
    a2, s2 = _ab(schedule, t_end)
    if s2 == 0:
        return x / a2
    return (x - s2 / s * z) / (a2 - s2 / s * a)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_target_is_two_teacher_steps_restated(prediction_type, steps):
    teacher, schedule = _model(prediction_type)
    loss = ProgressiveLoss(teacher, schedule, steps)
    grid = space_timesteps(T, 2 * steps, "trailing")  # ascending
    assert grid[1::2] == space_timesteps(T, steps, "trailing"), "the grids of N and 2N steps nest"
    g = torch.Generator().manual_seed(steps)
    for j in range(steps):
        z = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
        got = loss.target(z.float(), torch.full((3,), j), None)
        want = _restated_target(teacher, schedule, z, grid[2 * j + 1], grid[2 * j], grid[2 * j - 1] if j else -1)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                   msg=f"student step {j}")


def test_the_loss_is_the_truncated_snr_weighted_x_error():
    teacher, schedule = _model()
    student, _ = _model("v_prediction", seed=1)
    loss = ProgressiveLoss(teacher, schedule, 4)
    x0 = torch.rand(5, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    got = loss(student, x0, None, g, 0.0)
    g.set_state(state)  # the same draws, restated
    j = torch.randint(0, 4, (5,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    grid = space_timesteps(T, 8, "trailing")
    total = 0.0
    for i in range(5):
        t = grid[2 * int(j[i]) + 1]
        a, s = _ab(schedule, t)
        z = a * x0[i:i + 1].double() + s * eps[i:i + 1].double()
        jj = int(j[i])
        target = _restated_target(teacher, schedule, z, t, grid[2 * jj], grid[2 * jj - 1] if jj else -1)
        v = student(z.float(), torch.tensor([t]), None).double()
        x_hat = a * z - s * v
        total += max(a * a / (s * s), 1.0) * ((x_hat - target) ** 2).mean()
    torch.testing.assert_close(got.double(), total / 5, rtol=1e-4, atol=1e-7)


def test_a_short_round_brings_the_student_closer_to_the_teacher():
    """Sixty Adam steps on the loss: the student's one step lands measurably closer to the teacher's two."""
    teacher, schedule = _model(classes=None)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    loss = ProgressiveLoss(teacher, schedule, 2)
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1

    def held_out():
        with torch.no_grad():
            return float(loss(student, x0, None, torch.Generator().manual_seed(123), 0.0))

    before = held_out()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        loss(student, x0, None, g, 0.0).backward()
        opt.step()
    after = held_out()
    assert after < 0.5 * before, (before, after)


def test_round_schedule_halves_down_to_the_student():
    assert round_schedule(64, 1) == [32, 16, 8, 4, 2, 1]
    assert round_schedule(8, 2) == [4, 2]
    for bad, match in (((8, 0), "--student-steps must be a positive int"), ((4, 4), "must be below"),
                       ((12, 1), "times a power of two"), ((8, 3), "times a power of two")):
        with pytest.raises(ValueError, match=match):
            round_schedule(*bad)


def test_a_student_folder_records_what_it_samples_with(tmp_path):
    model, schedule = _model()
    save_pretrained(model, tmp_path / "s", schedule=student_schedule(schedule, 2))
    cfg = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction" and cfg["timestep_spacing"] == "trailing"
    assert cfg["_class_name"] == "DDIMScheduler"
    assert cfg["ddpm_fast_student"] == {"method": "progressive", "sampler": "ddim", "spacing": "trailing",
                                        "steps": [2]}
    back = NoiseSchedule.from_config(cfg)
    assert back.student == cfg["ddpm_fast_student"] and back.prediction_type == "v_prediction"
    for bad, match in (({"steps": [0], "sampler": "ddim", "spacing": "trailing"}, "positive ints"),
                       ({"steps": [1], "sampler": 3, "spacing": "trailing"}, "sampler must be"),
                       ({"steps": [1], "sampler": "ddim", "spacing": "odd"}, "spacing must be")):
        with pytest.raises(ValueError, match=match):
            NoiseSchedule.from_config(dict(cfg, ddpm_fast_student=bad))


# ---- the command -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    model, schedule = _model()
    path = tmp_path_factory.mktemp("teacher") / "t"
    save_pretrained(model, path, schedule=schedule)
    return str(path)


def _flags(teacher, data, out, *more):
    return ["--teacher", teacher, "--data", data, "--teacher-steps", "4", "--student-steps", "1", "--round-steps",
            "4", "--batch-size", "4", "--save-every", "2", "--log-every", "1", "--no-progress", "--out", str(out),
            *more]


def test_distill_writes_each_round_as_a_sampleable_student(teacher_folder, data, tmp_path):
    out = tmp_path / "run"
    assert distill_cli.main(_flags(teacher_folder, data, out)) == 0
    record = json.loads((out / "distill.json").read_text())
    assert record["rounds"] == [2, 1] and set(record["round_seconds"]) == {"1", "2"}
    for k, n in ((1, 2), (2, 1)):
        cfg = json.loads((out / f"round{k}_{n}steps" / "model" / "scheduler_config.json").read_text())
        assert cfg["ddpm_fast_student"]["steps"] == [n]
        assert (out / f"round{k}_{n}steps" / "metrics.jsonl").exists()


def test_an_interrupted_distillation_resumes_to_the_same_bits(teacher_folder, data, tmp_path, monkeypatch, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert distill_cli.main(_flags(teacher_folder, data, straight)) == 0
    real_step = trainer_lib.Trainer.step
    calls = []

    def step(self):
        calls.append(1)
        if len(calls) == 6:  # in the second round: the first is done, the second stops at a step boundary
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(trainer_lib.Trainer, "step", step)
    assert distill_cli.main(_flags(teacher_folder, data, split)) == 128 + signal.SIGINT
    assert "continue with --resume" in capsys.readouterr().err
    monkeypatch.setattr(trainer_lib.Trainer, "step", real_step)
    assert distill_cli.main(_flags(teacher_folder, data, split, "--resume")) == 0
    for folder in ("round1_2steps", "round2_1steps"):
        a = torch.load(straight / folder / "checkpoint.pt", weights_only=True)
        b = torch.load(split / folder / "checkpoint.pt", weights_only=True)
        assert a["step"] == b["step"] == 4
        for part in ("model", "ema"):
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), f"{folder} {part}.{k}"


def test_one_line_errors_and_nothing_written(teacher_folder, data, tmp_path, capsys):
    out = tmp_path / "a" / "out"
    assert distill_cli.main(_flags(str(tmp_path / "missing"), data, out)) == 2
    err = capsys.readouterr().err
    assert "missing: no such file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit):
        distill_cli.main(_flags(teacher_folder, data, out, "--student-steps", "0"))
    assert "--student-steps must be a positive int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill_cli.main(_flags(teacher_folder, data, out, "--method", "consistency"))
    assert not (tmp_path / "a").exists()
    assert distill_cli.main(_flags(teacher_folder, data, out, "--round-steps", "1")) == 0
    other = str(tmp_path / "other")
    save_pretrained(*_model(seed=3)[:1], other, schedule=NoiseSchedule.linear(T))
    capsys.readouterr()
    assert distill_cli.main(_flags(other, data, out, "--round-steps", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "differs from the saved one: teacher" in err and len(err.strip().splitlines()) == 1
    assert distill_cli.main(_flags(teacher_folder, data, out, "--round-steps", "1")) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err


def test_torchrun_distills_every_round_in_one_process_group(teacher_folder, data, tmp_path):
    """Two processes (gloo): the group stays up across the rounds (each round a Trainer run on it) and the
    students are written once, by rank 0."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "ddpm_fast.distill", *_flags(teacher_folder, data, tmp_path / "ddp", "--device", "cpu")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for folder in ("round1_2steps", "round2_1steps"):
        assert (tmp_path / "ddp" / folder / "model" / "config.json").exists()
    assert res.stdout.count("student (1 steps)") == 1


def test_the_embedded_teacher_by_name_or_by_default_is_the_same_run():
    from ddpm_fast.distillation import _record

    parse = distill_cli.build_parser().parse_args
    by_default, by_name = parse(["--data", "digits"]), parse(["--data", "digits", "--teacher", "digits"])
    assert _record(by_default, [1]) == _record(by_name, [1])
