"""The quality-vs-time front on the embedded digits model: every solver at 4/5/6/8/10/15/20 model evaluations,
with and without feature caching (cache_interval 2), and the cheapest point that matches today's default.

Per point:
- ``rms``: RMS distance (in [-1, 1] pixel units) of the deterministic, unclipped sample from a reference
  solution of the probability-flow ODE from the same x_T (DDIM with every training timestep, trailing,
  unclipped), as test_quality_bench.py measures it; 40 images, class k % 10. ``rms_se``: its standard error
  over images.
- ``fd``: Frechet distance to real digits in the feature space of test_quality_bench.py (a measurement aid
  for this table), 100 images as the CLI draws them (its default spacing and clipping for the sampler).
- ``seconds_per_image``: wall seconds per image of that 100-image run on the fast path (what ``--fp16`` runs
  on this device), median of interleaved rounds.
- ``cifar10_ms_per_image``: the same evaluations' cost on the cifar10 preset: one measured fast-path forward
  per image (whole U-Net, or the shallow branch on a cached step) times the evaluations.

A point is on the front (``front``) when no other point is both faster and more accurate (rms). Today's
default (DDIM, 100 steps, ``--sampler ddim``) is measured the same way, its fd over three seeds for the noise;
``match`` marks points whose sample quality matches it on one draw: fd <= default fd + 2 sd. (rms is not a
quality: it is how closely a sample follows the same x_T's exact ODE path, which DDIM itself only reaches at
100+ steps; it is reported for every point.) Then the matching points on the rms front, cheapest first, are
confirmed on four draws (seeds 1-4, ``fd_mean``/``fd_sd``) against the default's four: the first whose mean fd
is within two standard errors of the difference (or below) is the proposed default (printed, and in
extra_info as ``pick``).

Distilled students (ddpm_fast.distill) join the table as their own rows: the shipped ``digits-distilled``, and with
DDPM_FAST_STUDENTS=DIR every round's student of that distillation run (DIR/round*/model), each with the DDIM it was
trained for (unclipped for rms, as the CLI runs it for fd) on its own weights.

DDPM_FAST_FRONT=full is the recorded run (about 10 minutes on 2 CPU cores; DDPM_FAST_FRONT_OUT=DIR also writes
front.json, front.md and front.png there). By default (CI) a quick pass checks the harness on two solvers.
"""

import glob
import json
import os
import statistics
import time

import numpy as np
import pytest
import torch
from harness import record
from test_quality_bench import _frechet, _to_8x8

from ddpm_fast import (
    DDIMSampler,
    DEISSampler,
    DPMSolverSampler,
    HeunSampler,
    IPNDMSampler,
    NoiseSchedule,
    PLMSSampler,
    UNet,
    UNetConfig,
    UniPCSampler,
    ops,
)
from ddpm_fast.checkpoint import load_pretrained, load_schedule
from ddpm_fast.loading import DEFAULT_MODEL, EMBEDDED
from ddpm_fast.noise import initial_noise

FULL = os.environ.get("DDPM_FAST_FRONT", "quick") == "full"
OUT = os.environ.get("DDPM_FAST_FRONT_OUT")
EVALS = (4, 5, 6, 8, 10, 15, 20) if FULL else (5,)
N_RMS, N_FD, REF_STEPS, ROUNDS = (40, 100, 1000, 3) if FULL else (8, 20, 100, 1)
BASE_STEPS = 100 if FULL else 10  # today's default: DDIM, 100 steps
CACHE = (None, 2)


def _solvers(schedule):
    """name -> (evaluations -> (CLI-default sampler, unclipped ODE sampler, evaluations it makes))."""
    def fixed(make):
        return lambda e: (make(e, None), make(e, False), e)

    return {
        "ddim": fixed(lambda e, clip: DDIMSampler(schedule, e, clip_denoised=True if clip is None else clip)),
        "dpm++2m": fixed(lambda e, _: DPMSolverSampler(schedule, e, order=2)),
        "dpm++3m": fixed(lambda e, _: DPMSolverSampler(schedule, e, order=3)),
        "unipc2": fixed(lambda e, _: UniPCSampler(schedule, e, order=2)),
        "unipc3": fixed(lambda e, _: UniPCSampler(schedule, e, order=3)),
        "deis3": fixed(lambda e, _: DEISSampler(schedule, e, order=3)),
        "ipndm4": fixed(lambda e, _: IPNDMSampler(schedule, e, order=4)),
        "plms": lambda e: (PLMSSampler(schedule, e - 1),) * 2 + (e,),  # n steps, n + 1 evaluations
        "heun": lambda e: (HeunSampler(schedule, (e + 1) // 2),) * 2 + (2 * ((e + 1) // 2) - 1,),
    } if FULL else {
        "ddim": fixed(lambda e, clip: DDIMSampler(schedule, e, clip_denoised=True if clip is None else clip)),
        "unipc2": fixed(lambda e, _: UniPCSampler(schedule, e, order=2)),
    }


def _students():
    """(row name, model folder) of the distilled students on the front (see the module docstring)."""
    found = [("digits-distilled", EMBEDDED["digits-distilled"])] if os.path.isdir(EMBEDDED["digits-distilled"]) else []
    run = os.environ.get("DDPM_FAST_STUDENTS")
    if run:
        for folder in sorted(glob.glob(os.path.join(run, "round*", "model"))):
            found.append((f"progressive ({os.path.basename(os.path.dirname(folder))})", folder))
    return found


def _student_configs():
    configs = []
    for name, folder in _students():
        schedule = load_schedule(folder)
        steps = schedule.student["steps"][0]
        fast = load_pretrained(folder).eval().to_fast(ops.cpu_half_dtype())
        configs.append(dict(solver=name, evals=steps, cache=None, model=fast,
                            default=DDIMSampler(schedule, steps, spacing=schedule.student["spacing"]),
                            ode=DDIMSampler(schedule, steps, spacing=schedule.student["spacing"],
                                            clip_denoised=False)))
    return configs


@pytest.fixture(scope="module")
def setup():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    mlp = pytest.importorskip("sklearn.neural_network").MLPClassifier
    model = load_pretrained(DEFAULT_MODEL).eval()
    schedule = load_schedule(DEFAULT_MODEL) or NoiseSchedule.linear(1000)
    fast = model.to_fast(ops.cpu_half_dtype())
    labels = torch.arange(max(N_RMS, N_FD)) % 10
    x_T = initial_noise((N_RMS, 1, 16, 16), 0, torch.arange(N_RMS), "cpu", torch.contiguous_format)
    ref = DDIMSampler(schedule, REF_STEPS, spacing="trailing", clip_denoised=False).sample(
        model, x_T.shape, x_T=x_T, class_labels=labels[:N_RMS], progress=False, seed=0)
    d = load_digits()
    clf = mlp(hidden_layer_sizes=(32,), max_iter=2000, random_state=0).fit(d.data / 16.0, d.target)

    def embed(x8):
        return np.maximum(x8 @ clf.coefs_[0] + clf.intercepts_[0], 0.0)

    return dict(fast=fast, schedule=schedule, labels=labels, x_T=x_T, ref=ref, real=embed(d.data / 16.0),
                embed=embed)


def _rms(s, sampler, cache, model=None):
    out = sampler.sample(model or s["fast"], s["x_T"].shape, x_T=s["x_T"], class_labels=s["labels"][:N_RMS],
                         progress=False, seed=0, cache_interval=cache)
    per_image = ((out.float() - s["ref"]) ** 2).flatten(1).mean(1)
    rms = float(per_image.mean().sqrt())
    se = float(per_image.std() / (2 * rms * len(per_image) ** 0.5))  # delta method: d sqrt(m) = dm / (2 sqrt(m))
    return rms, se


def _draw_fd(s, sampler, cache, seed=1, model=None):
    """(fd, wall seconds) of a CLI-like N_FD-image run."""
    start = time.perf_counter()
    x = sampler.sample(model or s["fast"], (N_FD, 1, 16, 16), class_labels=s["labels"][:N_FD], progress=False,
                       seed=seed, cache_interval=cache)
    seconds = time.perf_counter() - start
    assert bool(torch.isfinite(x).all())
    return _frechet(s["embed"](_to_8x8(x)), s["real"]), seconds


def _cifar10_costs():
    """ms per image of one fast-path forward of the cifar10 preset (batch 8): whole, and shallow on cached deep
    features. (The tiny preset in the quick pass.)"""
    model = UNet(UNetConfig.from_name("cifar10" if FULL else "tiny", dropout=0.0)).eval()
    fast = model.to_fast(ops.cpu_half_dtype())
    size = fast.config.sample_size
    x = torch.randn(8, 3, size, size).contiguous(memory_format=torch.channels_last).to(fast.compute_dtype)
    t = torch.full((8,), 500)

    def whole():
        return fast(x, t)

    h, temb = fast.prepare(x, t)
    h, skips = fast.encode_shallow(h, temb)
    deep = fast.deep(h, temb)

    def shallow():
        h2, temb2 = fast.prepare(x, t)
        h2, sk = fast.encode_shallow(h2, temb2)
        return fast.decode_shallow(deep, sk, temb2)

    times = {}
    with torch.no_grad():
        for fn in (whole, shallow, whole, shallow):
            fn()
        for name, fn in (("whole", whole), ("shallow", shallow)):
            runs = []
            for _ in range(5 if FULL else 2):
                start = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - start)
            times[name] = 1000 * min(runs) / 8
    return times


def _confirm(s, configs, points, base_fd):
    """The cheapest matching front point whose fd over seeds 1-4 is within noise of the default's (see above)."""
    by_point = {(c["solver"], c["evals"], c["cache"] or 1): c for c in configs}
    for p in sorted((p for p in points if p["match"] and p["front"]), key=lambda p: p["seconds_per_image"]):
        c = by_point[(p["solver"], p["evals"], p["cache_interval"])]
        fds = [c["fd"]] + [_draw_fd(s, c["default"], c["cache"], seed=seed, model=c.get("model"))[0]
                           for seed in (2, 3, 4)]
        p["fd_mean"], p["fd_sd"] = round(statistics.mean(fds), 3), round(statistics.stdev(fds), 3)
        se = (statistics.variance(fds) / len(fds) + statistics.variance(base_fd) / len(base_fd)) ** 0.5
        p["confirmed"] = statistics.mean(fds) <= statistics.mean(base_fd) + 2 * se
        if p["confirmed"]:
            return p
    return None


def _front(points):
    for p in points:
        p["front"] = not any(q is not p and q["seconds_per_image"] <= p["seconds_per_image"] and q["rms"] <= p["rms"]
                             and (q["seconds_per_image"], q["rms"]) != (p["seconds_per_image"], p["rms"])
                             for q in points)


def test_quality_vs_time_front(benchmark, setup):
    s = setup
    schedule = s["schedule"]
    solvers = _solvers(schedule)
    configs, seen = [], set()
    for name, make in solvers.items():
        for e in EVALS:
            default, ode, evals = make(e)
            for cache in CACHE:
                if (name, evals, cache) not in seen:  # Heun makes odd counts only: 5 and 6 are both 5
                    seen.add((name, evals, cache))
                    configs.append(dict(solver=name, evals=evals, cache=cache, default=default, ode=ode))
    configs += _student_configs()
    baseline = DDIMSampler(schedule, BASE_STEPS)
    costs = _cifar10_costs()
    # quality (deterministic given x_T, no timing)
    for c in configs:
        c["rms"], c["rms_se"] = _rms(s, c["ode"], c["cache"], c.get("model"))
    base_rms, base_se = _rms(s, DDIMSampler(schedule, BASE_STEPS, clip_denoised=False), None)
    # fd and time, interleaved rounds over every config (and the baseline)
    times = {id(c): [] for c in configs}
    base_times, base_fd = [], []  # the default's fd on seeds 1, 2, 3 (and 4 for the confirmation)
    for r in range(ROUNDS):
        for c in configs:
            fd, sec = _draw_fd(s, c["default"], c["cache"], model=c.get("model"))
            c["fd"] = fd
            times[id(c)].append(sec)
        fd, sec = _draw_fd(s, baseline, None, seed=1 + r)
        base_fd.append(fd)
        base_times.append(sec)
    if len(base_fd) < 3:
        base_fd += [_draw_fd(s, baseline, None, seed=seed)[0] for seed in range(len(base_fd) + 1, 4)]
    fd_sd = statistics.stdev(base_fd)
    points = []
    for c in configs:
        whole = c["evals"] if not c["cache"] else len(range(0, c["evals"], c["cache"]))
        points.append(dict(
            solver=c["solver"], evals=c["evals"], cache_interval=c["cache"] or 1, rms=round(c["rms"], 5),
            rms_se=round(c["rms_se"], 5), fd=round(c["fd"], 3),
            seconds_per_image=round(statistics.median(times[id(c)]) / N_FD, 6),
            cifar10_ms_per_image=round(whole * costs["whole"] + (c["evals"] - whole) * costs["shallow"], 1)))
    _front(points)
    base = dict(solver="ddim (today's default)", evals=BASE_STEPS, cache_interval=1, rms=round(base_rms, 5),
                rms_se=round(base_se, 5), fd=round(statistics.mean(base_fd), 3), fd_sd=round(fd_sd, 3),
                seconds_per_image=round(statistics.median(base_times) / N_FD, 6),
                cifar10_ms_per_image=round(BASE_STEPS * costs["whole"], 1))
    for p in points:
        p["match"] = p["fd"] <= base["fd"] + 2 * fd_sd
    base_fd4 = base_fd + [_draw_fd(s, baseline, None, seed=4)[0]]
    base["fd_4_seeds"] = [round(f, 3) for f in base_fd4]
    pick = _confirm(s, configs, points, base_fd4)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings are the interleaved rounds above
    record(benchmark, rounds=ROUNDS, images_rms=N_RMS, images_fd=N_FD, reference_steps=REF_STEPS,
           cifar10_forward_ms=costs, baseline=base, pick=pick, points=points)
    for p in sorted(points, key=lambda p: p["seconds_per_image"]):
        print(json.dumps(p))
    print("baseline", json.dumps(base))
    print("pick", json.dumps(pick))
    assert all(np.isfinite(p["rms"]) and np.isfinite(p["fd"]) for p in points)
    if OUT:
        _write(OUT, points, base, pick, costs)


def _write(out, points, base, pick, costs):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "front.json"), "w") as f:
        json.dump(dict(points=points, baseline=base, pick=pick, cifar10_forward_ms=costs), f, indent=1)
    rows = ["| solver | evals | cache | rms (se) | fd | s/img (CPU) | cifar10 ms/img | front | matches default |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["solver"], p["evals"], p["cache_interval"])):
        rows.append(f"| {p['solver']} | {p['evals']} | {p['cache_interval']} | {p['rms']:.4f} ({p['rms_se']:.4f}) | "
                    f"{p['fd']:.2f} | {p['seconds_per_image']:.5f} | {p['cifar10_ms_per_image']:.0f} | "
                    f"{'**yes**' if p['front'] else ''} | {'yes' if p['match'] else ''} |")
    rows.append(f"| {base['solver']} | {base['evals']} | 1 | {base['rms']:.4f} ({base['rms_se']:.4f}) | "
                f"{base['fd']:.2f} (sd {base['fd_sd']:.2f}) | {base['seconds_per_image']:.5f} | "
                f"{base['cifar10_ms_per_image']:.0f} | | |")
    with open(os.path.join(out, "front.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    plot(points, base, pick, os.path.join(out, "front.png"))


def plot(points, base, pick, path):
    """The front as a figure: one color per solver, cached runs dotted; what lies above rms 1 is clipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    colors = plt.get_cmap("tab10").colors
    for k, name in enumerate(sorted({p["solver"] for p in points})):
        for cache, marker, style in ((1, "o", "-"), (2, "x", ":")):
            pts = sorted((p for p in points if p["solver"] == name and p["cache_interval"] == cache),
                         key=lambda p: p["seconds_per_image"])
            if pts:
                ax.plot([1000 * p["seconds_per_image"] for p in pts], [min(p["rms"], 1.0) for p in pts],
                        marker=marker, linestyle=style, color=colors[k % 10], markersize=4,
                        label=f"{name}{' (cache 2)' if cache == 2 else ''}")
    front = sorted((p for p in points if p["front"]), key=lambda p: p["seconds_per_image"])
    ax.plot([1000 * p["seconds_per_image"] for p in front], [min(p["rms"], 1.0) for p in front], color="black",
            linewidth=3, alpha=0.3, label="Pareto front")
    ax.axhline(base["rms"], color="gray", linestyle="--", label=f"DDIM {base['evals']} steps (old default)")
    ax.axvline(1000 * base["seconds_per_image"], color="gray", linestyle="--")
    if pick:
        ax.scatter([1000 * pick["seconds_per_image"]], [pick["rms"]], s=250, facecolors="none", edgecolors="red",
                   linewidths=2, label=f"new default: {pick['solver']}, {pick['evals']} evaluations", zorder=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=1.05)
    ax.set_xlabel("wall ms per image (embedded digits model, 100-image batch, fast path, 2-core CPU)")
    ax.set_ylabel("RMS distance from the 1000-step ODE solution (clipped at 1)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
