"""What a stopped or refused sampling command leaves: SIGTERM is one notice and exit 143, as Ctrl-C is 130, with the
--out folder released (no stale lock) and removed when the run made it and wrote nothing; a refused or failed run
removes every folder it made, parents included, and a run refused by a busy ancestor makes nothing. Real
processes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ddpm_fast.fileio import LOCK_NAME, RunFolder

LONG = {
    "sample": ["--num-samples", "5000", "--batch-size", "50", "--steps", "50"],
    "nll": ["--data", "digits", "--num-images", "500"],
}


def _start(command, out, *extra):
    # cwd away from the source tree: the installed package (with its extension) is what runs, as for a user
    return subprocess.Popen([sys.executable, "-m", f"ddpm_fast.{command}", *LONG[command], "--no-progress",
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.sep)


def _wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.5)  # past the folder checks, into the work


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("command", sorted(LONG))
def test_a_stopped_command_releases_and_removes_the_folder_it_made(tmp_path, command, signum, code):
    out = tmp_path / "a" / "b" / "out"
    proc = _start(command, out)
    _wait_for(out / LOCK_NAME, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert ("terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted") in lines[0]
    assert not (tmp_path / "a").exists()  # the folders it made, parents included, held nothing


def test_a_stopped_command_leaves_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    proc = _start("sample", out)
    _wait_for(out / LOCK_NAME, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_a_failed_run_removes_the_parents_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    res = subprocess.run([sys.executable, "-m", "ddpm_fast.sample", "--checkpoint", str(tmp_path / "missing"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "missing: no such file" in res.stderr
    assert not (tmp_path / "a").exists()


def test_a_busy_ancestor_refuses_before_anything_is_made(tmp_path):
    outer = tmp_path / "outer"
    with RunFolder(outer, "--out"):
        res = subprocess.run([sys.executable, "-m", "ddpm_fast.sample", "--num-samples", "1",
                              "--out", str(outer / "x" / "y")], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert res.returncode == 2 and "another ddpm_fast process is writing" in res.stderr
        assert sorted(os.listdir(outer)) == [LOCK_NAME]


_SHUTDOWN_SIGNALS = """
import atexit, os, signal, sys, threading, time
from ddpm_fast.cli import command_exit
print("ready", flush=True)
try:
    while True:
        time.sleep(1)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)

def more():
    while True:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.0002)

atexit.register(lambda: threading.Thread(target=more, daemon=True).start())  # SIGINTs while the interpreter exits
command_exit(130)
"""


def test_signals_while_a_command_shuts_down_keep_its_exit_code():
    """Once a command has decided its exit code (here 130, after its Ctrl-C notice), SIGINTs arriving while the
    interpreter shuts down are ignored: no KeyboardInterrupt traceback from the exit hooks, and never exit -2 (killed
    by SIGINT after the interpreter put the default handler back)."""
    proc = subprocess.Popen([sys.executable, "-c", _SHUTDOWN_SIGNALS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=os.sep)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip() == "interrupted", err[-2000:]
