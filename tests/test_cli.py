"""python -m ddpm_fast.train / ddpm_fast.sample end to end, on small settings."""

import importlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomize_

from ddpm_fast import NoiseSchedule, UNet, UNetConfig, ops, save_pretrained
from ddpm_fast import sample as sample_cli
from ddpm_fast import train as train_cli


@pytest.fixture
def tiny_model(tmp_path):
    cfg = UNetConfig.from_name("tiny", num_classes=3)
    path = tmp_path / "tiny_model"
    save_pretrained(randomize_(UNet(cfg), 0.05), path, schedule=NoiseSchedule.linear(20))
    return str(path)


def _sample(args, capsys=None):
    code = sample_cli.main(args + ["--no-progress"])
    return code


def test_sample_writes_grid_and_npz_and_is_deterministic(tmp_path, tiny_model):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    common = ["--checkpoint", tiny_model, "--num-samples", "5", "--batch-size", "2", "--steps", "4"]
    assert _sample(common + ["--out", str(out1)]) == 0
    assert _sample(common + ["--out", str(out2)]) == 0
    with np.load(out1 / "samples_5x8x8x3.npz") as a, np.load(out2 / "samples_5x8x8x3.npz") as b:
        assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (5, 8, 8, 3)
        assert a["arr_1"].tolist() == [0, 1, 2, 0, 1]
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert (out1 / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("sampler", ["unipc", "deis", "plms", "heun", "ipndm"])
def test_every_compiled_solver_samples_from_the_cli(tmp_path, tiny_model, sampler, capsys):
    """Each solver of the open set runs end to end (guided, the fast path) and names its evaluations."""
    out = tmp_path / sampler
    assert _sample(["--checkpoint", tiny_model, "--sampler", sampler, "--steps", "3", "--allow-few-steps",
                    "--num-samples", "3", "--guidance-scale", "2", "--fp16", "--out", str(out)]) == 0
    evals = {"plms": 4, "heun": 5}.get(sampler, 3)
    assert f"{sampler} {evals} steps" in capsys.readouterr().out
    assert _images(out / "samples_3x8x8x3.npz").shape == (3, 8, 8, 3)


def test_default_sampler_is_the_fronts_pick(tmp_path, tiny_model, capsys):
    """No --checkpoint: the embedded student with its own DDIM steps, unless a flag asks for the teacher's
    sampling; UniPC: 5 steps on the embedded teacher (its measured front), 10 on other checkpoints."""
    from ddpm_fast.checkpoint import load_schedule
    from ddpm_fast.loading import EMBEDDED

    steps = load_schedule(EMBEDDED["digits-distilled"]).student["steps"][0]
    assert _sample(["--num-samples", "2", "--out", str(tmp_path / "s")]) == 0
    assert f"ddim {steps} steps" in capsys.readouterr().out
    assert _sample(["--sampler", "ddim", "--num-samples", "2", "--out", str(tmp_path / "d")]) == 0
    assert "ddim 100 steps" in capsys.readouterr().out  # the teacher: the student runs only its own steps
    assert _sample(["--checkpoint", "digits", "--num-samples", "2", "--out", str(tmp_path / "e")]) == 0
    assert "unipc 5 steps" in capsys.readouterr().out
    assert _sample(["--checkpoint", tiny_model, "--num-samples", "2", "--out", str(tmp_path / "t")]) == 0
    assert "unipc 10 steps" in capsys.readouterr().out


def _images(path):
    with np.load(path) as f:
        return f["arr_0"]


def _close_images(a, b):
    """Same draws, so the same images up to the network's batch-size rounding (GEMM/conv blocking):
    at most one uint8 level, in a handful of values."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() <= 0.005


def test_sample_flags_change_what_they_should(tmp_path, tiny_model):
    """Each flag does something: guidance, the sampler, eta, the class label change the images; the graph
    engine draws the same ones as the eager loop."""
    def run(*extra):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        args = ["--checkpoint", tiny_model, "--num-samples", "4", "--steps", "4", "--out", str(out), *extra]
        assert _sample(args) == 0
        return _images(out / "samples_4x8x8x3.npz")

    base = run()
    for extra in (["--guidance-scale", "3.0"], ["--sampler", "ddpm"], ["--sampler", "ddim"],
                  ["--sampler", "ddim", "--eta", "1.0"], ["--class-label", "1"], ["--sampler", "dpm++"],
                  ["--sampler", "dpm++sde"], ["--sampler", "unipc", "--order", "1"]):
        assert not np.array_equal(run(*extra), base), f"{extra} changed nothing"
    dpm = run("--sampler", "dpm++", "--steps", "6")  # under 4 steps, order 3 is order 2 (warm-up, lower_order_final)
    for extra in (["--order", "3"], ["--order", "1"]):
        assert not np.array_equal(run("--sampler", "dpm++", "--steps", "6", *extra), dpm), f"{extra} changed nothing"
    assert np.array_equal(run("--engine", "graph"), base)
    assert np.array_equal(run("--sampler", "dpm++sde", "--order", "3", "--engine", "graph"),
                          run("--sampler", "dpm++sde", "--order", "3"))
    assert np.array_equal(run("--guidance-scale", "3.0", "--engine", "graph"), run("--guidance-scale", "3.0"))


@pytest.mark.parametrize("sampler", [["--sampler", "ddpm", "--steps", "5"], ["--sampler", "ddim", "--eta", "1.0"]])
def test_same_seed_same_images_whatever_the_batch_size(tmp_path, tiny_model, sampler):
    """Same draws for any --batch-size; with --batch-invariant the same bytes, also from --engine graph (the
    default chunk pads every batch here; chunks of 3 split a batch of 7 and place images differently)."""
    def run(bs, *extra):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert _sample(["--checkpoint", tiny_model, "--num-samples", "7", "--batch-size", bs, "--steps", "5",
                        "--out", str(out), *sampler, *extra]) == 0
        return _images(out / "samples_7x8x8x3.npz")

    plain = run("7")
    assert _close_images(plain, run("3")) and _close_images(plain, run("1"))
    assert len({plain[i].tobytes() for i in range(7)}) == 7, "images must differ from each other"
    for chunk in ([], ["--invariant-chunk", "3"]):
        invariant = run("7", "--batch-invariant", *chunk)
        assert _close_images(invariant, plain)
        for bs, extra in (("3", []), ("1", []), ("2", ["--engine", "graph"])):
            assert np.array_equal(run(bs, "--batch-invariant", *chunk, *extra), invariant), \
                f"--batch-size {bs} {' '.join(chunk + extra)} changed the bytes"


@pytest.mark.parametrize("native_bf16, faster", [(True, True), (True, False), (False, False)])
def test_sample_fp16_on_cpu_runs_the_fast_path(tmp_path, tiny_model, capsys, monkeypatch, native_bf16, faster):
    """On a CPU --fp16 runs bf16 where the CPU computes it faster than fp32, else the fp32 fast form; --bf16 runs
    bf16 (with a note where that is the slower choice). Each says so once, and the summary names what ran."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(ops, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(ops, "cpu_bf16_is_faster", lambda: faster)
    for flag, ran in (("--fp16", "bfloat16" if faster else "float32"), ("--bf16", "bfloat16")):
        out = tmp_path / flag.strip("-")
        assert _sample(["--checkpoint", tiny_model, "--num-samples", "2", "--steps", "2", "--allow-few-steps", flag,
                        "--out", str(out),
                        "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert f"fast path {ran} on cpu" in captured.out
        if flag == "--fp16":
            note = ("--fp16 on a CPU runs bf16" if faster else
                    "bf16 convolutions run slower" if native_bf16 else "no native half-precision")
        else:
            note = None if faster else "half the fp32 rate" if native_bf16 else "no native bf16 arithmetic"
        if note:
            assert captured.err.count(note) == 1, captured.err
        else:
            assert "--bf16" not in captured.err, captured.err


def test_cpu_half_dtype_follows_the_cpu_flags(monkeypatch):
    """--fp16's dtype on a CPU: bf16 with AMX, or AVX512-BF16 on a core without AVX512-FP16; fp32 on an AVX512-BF16
    core with AVX512-FP16 and no AMX (its bf16 dot product runs at half the fp32 rate), and without native bf16."""
    registry = importlib.import_module("ddpm_fast.ops.registry")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    for native, flags, want in ((True, {"amx_bf16", "avx512_fp16"}, torch.bfloat16),
                                (True, {"avx512_bf16"}, torch.bfloat16),
                                (True, {"avx512_bf16", "avx512_fp16"}, torch.float32),
                                (False, {"avx512f"}, torch.float32)):
        monkeypatch.setattr(registry, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr(registry, "_cpu_flags", lambda flags=flags: flags)
        assert registry.cpu_half_dtype() == want, flags


def test_sample_errors_are_one_line(tmp_path, tiny_model, capsys):
    assert _sample(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm_fast.sample: error:") and "no such file" in err and "\n" not in err
    assert _sample(["--checkpoint", tiny_model, "--class-label", "7", "--out", str(tmp_path / "o")]) == 2
    assert "--class-label must be in [0, 2]" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert _sample(["--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        sample_cli.main(["--steps", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        sample_cli.main(["--sampler", "euler"])
    for bad in (["--invariant-chunk", "4"], ["--batch-invariant", "--invariant-chunk", "0"],
                ["--batch-invariant", "--invariant-chunk", "10000"]):
        with pytest.raises(SystemExit):
            sample_cli.main(bad)
        assert "--invariant-chunk" in capsys.readouterr().err


def test_non_finite_samples_fail_and_write_nothing(tmp_path, capsys):
    model = UNet(UNetConfig.from_name("tiny"))
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    save_pretrained(model, tmp_path / "nan_model", schedule=NoiseSchedule.linear(20))
    out = tmp_path / "o"
    # Non-finite weights are refused before sampling, naming the tensor.
    assert _sample(["--checkpoint", str(tmp_path / "nan_model"), "--num-samples", "2", "--out", str(out)]) == 2
    assert "nan_model: non-finite weights in conv_out.bias" in capsys.readouterr().err
    assert not out.exists(), "a failed run leaves no empty --out behind"
    # Finite weights whose output overflows: the samples are checked, nothing is written.
    with torch.no_grad():
        model.conv_out.bias.fill_(0.0)
        model.conv_out.weight.fill_(3e38)
        model.conv_in.bias.fill_(1.0)
    save_pretrained(model, tmp_path / "inf_model", schedule=NoiseSchedule.linear(20))
    assert _sample(["--checkpoint", str(tmp_path / "inf_model"), "--num-samples", "2", "--out", str(out)]) == 2
    assert "sampling produced non-finite values or values beyond +-100 (the data range is [-1, 1]) in image 0" \
        in capsys.readouterr().err
    assert not out.exists()
    for flag, value in (("--guidance-scale", "nan"), ("--eta", "inf"), ("--eta", "50")):
        with pytest.raises(SystemExit) as exc:
            sample_cli.main([flag, value, "--out", str(out)])
        assert exc.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta applies to --sampler ddim only"),
    (["--sampler", "ddim", "--variance", "fixed_large"], "--variance applies to --sampler ddpm only"),
    (["--sampler", "ddim", "--order", "3"], "--order applies to --sampler dpm++ / dpm++sde / unipc / deis / ipndm"),
    (["--sampler", "heun", "--order", "2"], "(--sampler heun has none)"),
    (["--sampler", "dpm++", "--eta", "1.0"], "--eta applies to --sampler ddim only"),
    (["--sampler", "dpm++", "--order", "4"], "--order of --sampler dpm++ is 1 to 3, got 4"),
    (["--sampler", "ipndm", "--order", "5"], "invalid choice: 5"),
    (["--sampler", "unipc", "--timestep-respacing", "ddim25"], "--timestep-respacing picks the steps of"),
    (["--device", "bogus"], "--device 'bogus': not a device"),
    (["--device", "mps"], "only cpu and cuda are supported"),
    (["--seed", str(2**64)], "--seed: seed must lie in"),
    (["--guidance-scale", "inf"], "--guidance-scale must be finite"),
])
def test_sample_flags_that_would_be_ignored_or_wrong_are_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        sample_cli.main([*flags, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sample_bad_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # The checkpoint does not exist either: the --out error comes first, before loading or sampling.
    assert _sample(["--checkpoint", str(tmp_path / "missing"), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ddpm_fast.sample: error: --out {blocker / 'sub'}: cannot write there (Not a directory)"
    assert _sample(["--checkpoint", str(tmp_path / "missing"), "--out", str(blocker)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_unconditional_model_rejects_guidance(tmp_path, capsys):
    path = tmp_path / "uncond"
    save_pretrained(UNet(UNetConfig.from_name("tiny")), path)
    assert _sample(["--checkpoint", str(path), "--guidance-scale", "2", "--out", str(tmp_path / "o")]) == 2
    assert "needs a class-conditional model" in capsys.readouterr().err


def _npz_data(path, n=24, size=8, labels=True):
    rng = np.random.default_rng(0)
    arrays = {"arr_0": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}
    if labels:
        arrays["arr_1"] = rng.integers(0, 3, n)
    np.savez(path, **arrays)
    return str(path)


def _train(args):
    return train_cli.main(args + ["--no-progress", "--log-every", "1"])


TRAIN = ["--config", "tiny", "--batch-size", "4", "--num-timesteps", "50", "--warmup", "2"]


def test_train_then_sample(tmp_path):
    data = _npz_data(tmp_path / "d.npz", labels=False)
    out = tmp_path / "run"
    assert _train(TRAIN + ["--data", data, "--steps", "3", "--out", str(out), "--sample-every", "3"]) == 0
    assert (out / "checkpoint.pt").exists() and (out / "samples" / "step_0000003.png").exists()
    assert sorted(os.listdir(out / "model")) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                 "scheduler_config.json"]
    npzs = []
    for ckpt in (out / "model", out / "checkpoint.pt", out):  # a run folder means its exported model/
        args = ["--checkpoint", str(ckpt), "--num-samples", "2", "--steps", "3", "--out", str(tmp_path / "s")]
        assert _sample(args) == 0
        npzs.append(_images(tmp_path / "s" / "samples_2x8x8x3.npz"))
    assert np.array_equal(npzs[0], npzs[2]) and _close_images(npzs[0], npzs[1])
    # An interrupted run has no model/ yet: its folder means its checkpoint.pt (the EMA weights).
    shutil.rmtree(out / "model")
    assert _sample(["--checkpoint", str(out), "--num-samples", "2", "--steps", "3", "--out", str(tmp_path / "s")]) == 0
    assert np.array_equal(npzs[1], _images(tmp_path / "s" / "samples_2x8x8x3.npz"))
    (out / "checkpoint.pt").unlink()
    assert _sample(["--checkpoint", str(out), "--out", str(tmp_path / "s")]) == 2


def _state(path):
    return torch.load(path, weights_only=True)


def test_resume_is_exact(tmp_path):
    data = _npz_data(tmp_path / "d.npz", labels=False)
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = TRAIN + ["--data", data, "--save-every", "100"]
    assert _train(common + ["--steps", "6", "--out", str(straight)]) == 0
    assert _train(common + ["--steps", "3", "--out", str(split)]) == 0
    assert _train(common + ["--steps", "6", "--out", str(split), "--resume"]) == 0
    a, b = _state(straight / "checkpoint.pt"), _state(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for k, v in a["optimizer"]["state"].items():
        for name, tensor in v.items():
            assert torch.equal(tensor, b["optimizer"]["state"][k][name]), f"optimizer {k}.{name}"


def test_resume_with_other_flags_is_refused(tmp_path, capsys):
    data = _npz_data(tmp_path / "d.npz", labels=False)
    out = tmp_path / "run"
    assert _train(TRAIN + ["--data", data, "--steps", "1", "--out", str(out)]) == 0
    assert _train(TRAIN + ["--data", data, "--steps", "2", "--out", str(out), "--resume", "--lr", "1e-3"]) == 2
    assert "--lr 0.0002 (checkpoint) vs 0.001" in capsys.readouterr().err


def test_train_data_errors(tmp_path, capsys):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(TRAIN + ["--data", str(empty), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (9, 8)).save(mixed / "b.png")
    (mixed / "b.png").write_bytes(b"garbage")
    assert _train(TRAIN + ["--data", str(mixed), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "b.png: cannot read image" in capsys.readouterr().err
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    assert _train(TRAIN + ["--data", str(tmp_path / "big.npz"), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "data is 16x16 with 3 channel(s), the model config wants 8x8 with 3" in capsys.readouterr().err
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    assert _train(TRAIN + ["--data", str(tmp_path / "f.npz"), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "arr_0 must be uint8" in capsys.readouterr().err
    assert _train(TRAIN + ["--data", str(tmp_path / "nope"), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--data", "digits", "--batch-size", "0"])


def test_train_digits_conditional_with_label_dropout(tmp_path):
    pytest.importorskip("sklearn")
    assert _train(["--data", "digits", "--config", "digits", "--batch-size", "4", "--steps", "2",
                   "--num-timesteps", "20", "--cond-drop-prob", "0.5", "--out", str(tmp_path / "d")]) == 0


def _torchrun(module, args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", module] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [["--sampler", "ddpm"], ["--sampler", "ddim", "--eta", "1.0"]])
def test_torchrun_sampling_shards_over_two_processes(tmp_path, tiny_model, sampler):
    """Two processes (one thread each) draw the images one process draws; with --batch-invariant the same
    bytes. The embedded digits model: its 1x1 shortcut convolution rounds differently by thread count."""
    common = ["--num-samples", "5", "--steps", "3", "--allow-few-steps", "--device", "cpu", "--no-progress", *sampler]
    tiny = ["--checkpoint", tiny_model, *common]
    res = _torchrun("ddpm_fast.sample", tiny + ["--out", str(tmp_path / "r1")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp_path / "r1" / "samples_5x8x8x3.npz") as f:
        a, la = f["arr_0"], f["arr_1"]
    assert a.shape == (5, 8, 8, 3) and la.tolist() == [0, 1, 2, 0, 1]
    assert len({a[i].tobytes() for i in range(5)}) == 5, "ranks must draw distinct images"
    assert sample_cli.main(tiny + ["--out", str(tmp_path / "one")]) == 0
    assert _close_images(a, _images(tmp_path / "one" / "samples_5x8x8x3.npz")), "one process draws the same images"

    # More processes than images: the idle rank joins the gather with nothing, rank 0 writes the one image.
    res = _torchrun("ddpm_fast.sample", tiny + ["--num-samples", "1", "--out", str(tmp_path / "r3")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _images(tmp_path / "r3" / "samples_1x8x8x3.npz").shape == (1, 8, 8, 3)

    invariant = common + ["--batch-invariant"]
    res = _torchrun("ddpm_fast.sample", invariant + ["--out", str(tmp_path / "r2")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    two = _images(tmp_path / "r2" / "samples_5x16x16x1.npz")
    assert sample_cli.main(invariant + ["--batch-size", "3", "--out", str(tmp_path / "one_inv")]) == 0
    assert np.array_equal(two, _images(tmp_path / "one_inv" / "samples_5x16x16x1.npz")), \
        "--batch-invariant: two processes must write the bytes one process writes"


@pytest.mark.slow
def test_torchrun_training_ddp_gloo(tmp_path):
    data = _npz_data(tmp_path / "d.npz", labels=False)
    res = _torchrun("ddpm_fast.train", TRAIN + ["--data", data, "--steps", "2", "--device", "cpu", "--no-progress",
                                                "--out", str(tmp_path / "ddp")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "ddp" / "model" / "config.json").exists()


def test_train_learn_sigma_then_sample_with_learned_variance(tmp_path, capsys):
    """--learn-sigma trains on L_hybrid (eps and v out); the export loads back as a learned-sigma model, and
    sampling's ddpm picks learned_range by itself; resuming without the flag is refused."""
    data = _npz_data(tmp_path / "d.npz", labels=False)
    out = tmp_path / "run"
    flags = TRAIN + ["--data", data, "--out", str(out), "--learn-sigma", "--num-timesteps", "100"]
    assert _train(flags + ["--steps", "2"]) == 0
    from ddpm_fast import load_pretrained

    model = load_pretrained(out / "model")
    assert model.config.learn_sigma and model.conv_out.out_channels == 6
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["args"]["learn_sigma"] is True
    schedule = NoiseSchedule.from_config(json_load(out / "model" / "scheduler_config.json"))
    assert schedule.betas[0].item() == pytest.approx(1e-3)  # improved-diffusion's linear range, scaled by 1000/T
    capsys.readouterr()
    args = ["--checkpoint", str(out), "--num-samples", "2", "--sampler", "ddpm", "--steps", "5",
            "--out", str(tmp_path / "s")]
    assert _sample(args) == 0
    assert "ddpm (learned_range) 5 steps" in capsys.readouterr().out
    assert _train([a for a in flags if a != "--learn-sigma"] + ["--steps", "3", "--resume"]) == 2
    assert "--learn-sigma True (checkpoint) vs False" in capsys.readouterr().err


def json_load(path):
    import json

    with open(path) as f:
        return json.load(f)


def test_train_adm_preset_then_sample(tmp_path, capsys):
    """--config adm-tiny trains openai's architecture (with --learn-sigma: L_hybrid); the export and the
    checkpoint load back as an ADM model and sample."""
    from ddpm_fast import load_pretrained
    from ddpm_fast.adm import ADMUNet

    data = _npz_data(tmp_path / "d.npz", labels=False)
    out = tmp_path / "run"
    flags = ["--config", "adm-tiny", "--batch-size", "4", "--num-timesteps", "50", "--warmup", "2", "--data", data,
             "--out", str(out), "--learn-sigma", "--steps", "2"]
    assert _train(flags) == 0
    for path in (out / "model", out / "checkpoint.pt"):
        model = load_pretrained(path)
        assert isinstance(model, ADMUNet) and model.config.learn_sigma
    capsys.readouterr()
    assert _sample(["--checkpoint", str(out), "--num-samples", "2", "--sampler", "ddpm", "--steps", "4",
                    "--out", str(tmp_path / "s")]) == 0
    assert "ddpm (learned_range) 4 steps" in capsys.readouterr().out
    with np.load(tmp_path / "s" / "samples_2x8x8x3.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3)


_FAULTS = """
import resource, torch
from ddpm_fast import keep_freed_memory
print(keep_freed_memory())
from ddpm_fast.checkpoint import load_pretrained
from ddpm_fast.loading import DEFAULT_MODEL
model = load_pretrained(DEFAULT_MODEL).to_fast(torch.float32, copy=False)
x, t, labels = torch.randn(64, 1, 16, 16), torch.full((64,), 500), torch.arange(64) % 10
with torch.no_grad():
    for i in range(6):
        if i == 2:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x, t, labels)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or ops.extension() is None,
                    reason="glibc's allocator; the fast path's kernels")
def test_freed_memory_is_kept_for_reuse():
    """keep_freed_memory (the CLIs call it at start): the embedded model's fast forward at batch 64 frees and
    allocates its activations each call; kept, they are not page-faulted in again (with glibc's defaults a few
    thousand pages a call are). DDPM_FAST_KEEP_FREED_MEMORY=0 leaves the allocator as it was."""
    faults = {}
    for setting in ("1", "0"):
        env = {**os.environ, "DDPM_FAST_KEEP_FREED_MEMORY": setting}
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        if setting == "1" and applied == "False":
            pytest.skip("this C library has no mallopt (not glibc)")
        assert applied == ("True" if setting == "1" else "False")
        faults[setting] = int(count)
    assert 3 * faults["1"] < faults["0"], faults  # page faults in 4 forwards after 2 to warm up


def test_keep_freed_memory_setting_is_checked(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KEEP_FREED_MEMORY", "yes")
    with pytest.raises(SystemExit):
        sample_cli.main(["--checkpoint", tiny_model, "--out", str(tmp_path / "s"), "--num-samples", "1"])
    assert "DDPM_FAST_KEEP_FREED_MEMORY must be 0 or 1, got 'yes'" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["sample", "train", "nll"])
def test_help_states_each_default_once(module):
    """--help adds "(default: X)" only where the flag's own text does not state its default and X says something."""
    import importlib

    from ddpm_fast.cli import DefaultsHelpFormatter

    parser = importlib.import_module(f"ddpm_fast.{module}").build_parser()
    formatter = DefaultsHelpFormatter(parser.prog)
    for action in parser._actions:
        text = formatter._get_help_string(action) or ""
        text = text % {**vars(action), "prog": parser.prog} if "%(" in text else text
        assert "(default: None)" not in text and "(default: False)" not in text, (action.dest, text)
        if "default" in (action.help or ""):  # the flag's own text states it: nothing added
            own = action.help % {**vars(action), "prog": parser.prog} if "%(" in action.help else action.help
            assert text == own, (action.dest, text)
    full = parser.format_help()
    assert "(default: None)" not in full


def test_a_grid_is_laid_out_by_the_images_not_the_class_count(tmp_path):
    """A 1000-class model without --class-label: 6 images make a grid about square, not 1000 columns wide."""
    from PIL import Image

    from ddpm_fast.images import grid

    path = tmp_path / "many_classes"
    save_pretrained(randomize_(UNet(UNetConfig.from_name("tiny", num_classes=1000)), 0.05), path,
                    schedule=NoiseSchedule.linear(20))
    out = tmp_path / "out"
    assert _sample(["--checkpoint", str(path), "--num-samples", "6", "--steps", "2", "--allow-few-steps", "--out",
                    str(out)]) == 0
    width, height = Image.open(out / "grid.png").size
    scale = 128 // 8
    assert width == (3 * 10 + 2) * scale and height == (2 * 10 + 2) * scale  # 3 x 2 images of 8 px, 2 px padding
    images = torch.zeros(3, 8, 8, 1, dtype=torch.uint8)
    assert grid(images, nrow=10).shape == (12, 3 * 10 + 2, 1)  # never wider than the images need
