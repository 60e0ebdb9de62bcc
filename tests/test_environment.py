"""The DDPM_FAST_* environment: importing the package never fails on it; every command checks it before any work
(before a model loads, before --out is made) and refuses a bad value in one line, exit 2. Real processes."""

import os
import subprocess
import sys

import pytest

COMMANDS = {
    "sample": ["--num-samples", "1"],
    "nll": ["--data", "digits", "--num-images", "1"],
    "train": ["--data", "digits", "--steps", "1"],
}


def _run(args, env, cwd):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def _refused(res, *words):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("value", ["garbage", ""])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_backend_variable_is_one_line_before_any_work(tmp_path, value, command):
    env = {**os.environ, "DDPM_FAST_BACKEND": value}
    out = tmp_path / "out"
    res = _run(["-m", f"ddpm_fast.{command}", *COMMANDS[command], "--out", str(out)], env, tmp_path)
    _refused(res, f"ddpm_fast.{command}: error:", f"DDPM_FAST_BACKEND={value!r}", "auto, triton, native, torch")
    assert not out.exists()


def test_the_library_imports_with_a_bad_backend_variable_and_runs_auto(tmp_path):
    env = {**os.environ, "DDPM_FAST_BACKEND": "garbage"}
    code = ("import warnings, torch\n"
            "import ddpm_fast\n"
            "from ddpm_fast import ops\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    y = ops.residual_add(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2))\n"
            "print(ops.requested_backend(), float(y.sum()), [str(w.message) for w in caught])\n")
    res = _run(["-c", code], env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("auto 16.0") and "DDPM_FAST_BACKEND='garbage'" in res.stdout


@pytest.mark.parametrize("command", ["sample", "train"])
def test_a_backend_that_cannot_run_on_the_device_is_refused_before_loading(tmp_path, command):
    """triton on a CPU without the interpreter: refused at start, not after the model has loaded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DDPM_FAST_BACKEND"] = "triton"
    out = tmp_path / "out"
    res = _run(["-m", f"ddpm_fast.{command}", *COMMANDS[command], "--device", "cpu", "--out", str(out)], env, tmp_path)
    _refused(res, "DDPM_FAST_BACKEND=triton cannot run on cpu", "TRITON_INTERPRET=1")
    assert not out.exists()


def test_a_launch_record_in_a_missing_folder_is_named(tmp_path):
    env = {**os.environ, "DDPM_FAST_RECORD_LAUNCHES": str(tmp_path / "missing" / "launches.jsonl")}
    res = _run(["-m", "ddpm_fast.sample", "--num-samples", "1", "--out", str(tmp_path / "out")], env, tmp_path)
    _refused(res, "DDPM_FAST_RECORD_LAUNCHES=", "does not exist")
