"""The variational bound in bits/dim (ddpm_fast.likelihood) and python -m ddpm_fast.nll.

The references are direct float64 restatements of the closed forms (the Gaussian KL, the posterior, the
three reverse variances), numerical integration of the Gaussian density over the 8-bit bins, and an eager
loop over t as improved-diffusion's calc_bpd_loop runs it.
"""

import math

import numpy as np
import pytest
import torch
from conftest import randomize_

from ddpm_fast import NoiseSchedule, UNet, UNetConfig
from ddpm_fast import nll as nll_cli
from ddpm_fast.likelihood import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    strata,
    vb_terms_bpd,
    vb_terms_from_output,
)
from ddpm_fast.noise import BOUND_STREAM, normal


def _tables(betas):
    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    return dict(acp=acp, post_var=post_var, post_log=np.log(np.append(post_var[1], post_var[1:])),
                c1=betas * np.sqrt(acp_prev) / (1 - acp), c2=(1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp))


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _np_term(x0, x_t, eps, v, k, betas, variance, clip):
    """The term at t = k of one image, float64, straight from the formulas."""
    tb = _tables(betas)
    pred = np.sqrt(1 / tb["acp"][k]) * x_t - np.sqrt(1 / tb["acp"][k] - 1) * eps
    if clip:
        pred = np.clip(pred, -1, 1)
    mean = tb["c1"][k] * pred + tb["c2"][k] * x_t
    if variance == "learned_range":
        frac = (v + 1) / 2
        log_var = frac * np.log(betas[k]) + (1 - frac) * tb["post_log"][k]
    elif variance == "fixed_large":
        log_var = np.full_like(x0, np.log(tb["post_var"][1] if k == 0 else betas[k]))
    else:
        log_var = np.full_like(x0, tb["post_log"][k])
    if k > 0:
        true_mean, true_log = tb["c1"][k] * x0 + tb["c2"][k] * x_t, tb["post_log"][k]
        kl = 0.5 * (-1 + log_var - true_log + np.exp(true_log - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
        return kl.mean() / math.log(2)
    sd = np.exp(0.5 * log_var)
    cdf = np.vectorize(lambda z: 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))))
    hi, lo = cdf((x0 - mean + 1 / 255) / sd), cdf((x0 - mean - 1 / 255) / sd)
    logp = np.where(x0 < -0.999, np.log(np.maximum(hi, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))))
    return -logp.mean() / math.log(2)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_vb_terms_equal_the_closed_forms(variance, clip):
    schedule = NoiseSchedule.cosine(30)
    g = torch.Generator().manual_seed(7)
    n = 6
    x0 = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float() / 127.5 - 1
    t = torch.tensor([0, 0, 1, 5, 17, 29])
    # x_t drawn from q(x_t | x_0) and an eps prediction near the truth (a trained model's regime: an fp32 bound
    # is meaningful there; a wild guess puts bins beyond fp32's resolution of the CDF).
    noise = torch.randn(n, 3, 4, 4, generator=g)
    x_t = schedule.sqrt_alphas_cumprod[t].float().view(-1, 1, 1, 1) * x0 + \
        schedule.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1) * noise
    eps = noise + 0.05 * torch.randn(n, 3, 4, 4, generator=g)
    out = torch.cat([eps, torch.rand(n, 3, 4, 4, generator=g) * 2 - 1], 1)
    got = vb_terms_from_output(schedule, out, x0, x_t, t, clip, variance)
    betas = schedule.betas.numpy()
    for i in range(n):
        want = _np_term(x0[i].double().numpy(), x_t[i].double().numpy(), out[i, :3].double().numpy(),
                        out[i, 3:].double().numpy(), int(t[i]), betas, variance, clip)
        assert got[i].item() == pytest.approx(want, rel=2e-4, abs=1e-6), (i, int(t[i]))


def test_normal_kl_closed_form():
    m1, l1, m2, l2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    want = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + (m1 - m2) ** 2) / (2 * 2.0) - 0.5
    got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, l1, m2, l2)))
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.004, 0.02, 0.3])
def test_discretized_likelihood_integrates_the_density_over_each_bin(sigma):
    """P(bin) against the Gaussian density integrated numerically over the bin; the edge bins reach to
    +-infinity. Agreement to the tanh CDF approximation's error (a few 1e-4)."""
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean = 0.37
    logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean),
                                               torch.full_like(grid, math.log(sigma)))
    probs = logp.exp().numpy()
    want = []
    for x in grid.tolist():
        lo = x - 1 / 255 if x > -0.999 else mean - 40 * sigma
        hi = x + 1 / 255 if x < 0.999 else mean + 40 * sigma
        if hi <= lo:
            want.append(0.0)
            continue
        z = np.linspace(lo, hi, 4001)
        dens = np.exp(-0.5 * ((z - mean) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        want.append(np.trapezoid(dens, z) if hasattr(np, "trapezoid") else np.trapz(dens, z))
    want = np.array(want)
    assert abs(want.sum() - 1) < 1e-6  # the bins cover the line
    np.testing.assert_allclose(probs, want, atol=6e-4)
    assert abs(probs.sum() - 1) < 2e-3


def test_prior_bpd_is_the_closed_form():
    schedule = NoiseSchedule.linear(50)
    x0 = torch.rand(3, 1, 2, 2) * 2 - 1
    acp = float(schedule.alphas_cumprod[-1])
    mean, var = math.sqrt(acp) * x0.double(), 1 - acp
    want = (0.5 * (-1 - math.log(var) + var + mean**2)).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(prior_bpd(schedule, x0).double(), want, rtol=1e-5, atol=1e-9)


def _model():
    torch.manual_seed(0)
    return randomize_(UNet(UNetConfig.from_name("tiny")).eval(), 0.05)


def test_total_equals_the_eager_loop_over_t_with_the_same_noise():
    """bits_per_dim batches (image, t) pairs; an eager loop over t (improved-diffusion's way) on the same
    Philox draws gives the same bound, term by term."""
    model, schedule = _model(), NoiseSchedule.cosine(12)
    x0 = torch.randint(0, 256, (3, 3, 8, 8)).float() / 127.5 - 1
    bound = bits_per_dim(model, schedule, x0, seed=5, batch_size=7)
    counter = torch.tensor([5, 0])
    total = prior_bpd(schedule, x0)
    for t in reversed(range(12)):
        ts = torch.full((3,), t)
        noise = normal(counter, torch.arange(3), x0[0].numel(), BOUND_STREAM, steps=ts).view(x0.shape)
        x_t = schedule.sqrt_alphas_cumprod[t].float() * x0 + schedule.sqrt_one_minus_alphas_cumprod[t].float() * noise
        with torch.no_grad():
            term = vb_terms_bpd(model, schedule, x0, x_t, ts)
        torch.testing.assert_close(bound.vb[:, t], term, rtol=1e-5, atol=1e-6)
        total = total + term
    torch.testing.assert_close(bound.total_bpd, total, rtol=1e-5, atol=1e-6)
    assert bound.vb.shape == bound.mse.shape == bound.xstart_mse.shape == (3, 12)


def test_an_image_bound_does_not_depend_on_its_batch():
    model, schedule = _model(), NoiseSchedule.linear(10)
    x0 = torch.randint(0, 256, (4, 3, 8, 8)).float() / 127.5 - 1
    full = bits_per_dim(model, schedule, x0, seed=2, batch_size=40)
    alone = bits_per_dim(model, schedule, x0[2:3], seed=2, image_index=2, batch_size=3)
    torch.testing.assert_close(alone.total_bpd, full.total_bpd[2:3], rtol=1e-5, atol=1e-6)
    other = bits_per_dim(model, schedule, x0, seed=3, batch_size=40)
    assert not torch.allclose(other.total_bpd, full.total_bpd)


def test_estimate_with_every_timestep_is_the_full_bound_and_is_unbiased():
    model, schedule = _model(), NoiseSchedule.linear(16)
    x0 = torch.randint(0, 256, (2, 3, 8, 8)).float() / 127.5 - 1
    full = bits_per_dim(model, schedule, x0, seed=1, batch_size=64)
    every = bits_per_dim(model, schedule, x0, seed=1, batch_size=64, estimate=16)  # strata of one step each
    torch.testing.assert_close(every.total_bpd, full.total_bpd, rtol=1e-5, atol=1e-6)
    assert [len(s) for s in strata(16, 4)] == [1, 2, 3, 10] and strata(16, 4)[0] == range(0, 1)  # geometric
    for big_t, k in ((1000, 50), (1000, 200), (1000, 2), (10, 3), (4000, 4000)):
        parts = strata(big_t, k)
        assert len(parts) == k and parts[0] == range(0, 1) and parts[-1].stop == big_t
        assert all(a.stop == b.start and len(a) >= 1 for a, b in zip(parts, parts[1:], strict=False))
    assert [len(s) for s in strata(1000, 50)[:12]] == [1] * 12, "the small t, where the bits are, exactly"
    # Unbiased: over many seeds the estimates average to the bound of the (seed-independent) expectation; the
    # terms themselves depend on the noise, so compare with the mean of full bounds over the same seeds.
    est = torch.stack([bits_per_dim(model, schedule, x0, seed=s, estimate=4).total_bpd for s in range(40)])
    ref = torch.stack([bits_per_dim(model, schedule, x0, seed=s).total_bpd for s in range(40)])
    se = est.std(0) / math.sqrt(40)
    assert ((est.mean(0) - ref.mean(0)).abs() < 4 * se + 1e-4).all()
    with pytest.raises(ValueError, match=r"K must be an int in \[2, 16\]"):
        bits_per_dim(model, schedule, x0, estimate=1)


def test_nll_cli_writes_the_table_and_the_plot(tmp_path, capsys):
    out = tmp_path / "out"
    assert nll_cli.main(["--data", "digits", "--num-images", "3", "--estimate", "10", "--out", str(out),
                         "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "3 images:" in summary and "bits/dim" in summary and "decoder (t=0)" in summary
    lines = (out / "bpd.csv").read_text().splitlines()
    assert lines[0] == "index,label,total_bpd,prior_bpd,decoder_bpd,stderr" and len(lines) == 4
    assert [line.split(",")[:2] for line in lines[1:]] == [["0", "0"], ["1", "1"], ["2", "2"]]
    assert all(0 < float(line.split(",")[2]) < 20 for line in lines[1:])
    assert (out / "terms.png").stat().st_size > 1000
    graph = tmp_path / "graph"
    assert nll_cli.main(["--data", "digits", "--num-images", "3", "--estimate", "10", "--out", str(graph),
                         "--no-progress", "--engine", "graph", "--batch-size", "7"]) == 0
    got = [[float(v) for v in line.split(",")[2:]] for line in (graph / "bpd.csv").read_text().splitlines()[1:]]
    want = [[float(v) for v in line.split(",")[2:]] for line in lines[1:]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.npz"], "missing.npz: no such file"),
    (["--data", "DATA", "--conditional", "--checkpoint", "TINY"], "--conditional needs a class-conditional model"),
    (["--data", "DATA", "--checkpoint", "TINY", "--estimate", "11"], "K must be an int in [2, 10]"),
])
def test_nll_cli_errors_are_one_line(tmp_path, capsys, args, message):
    from ddpm_fast import save_pretrained

    save_pretrained(_model(), tmp_path / "tiny", schedule=NoiseSchedule.linear(10))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), arr_1=np.arange(4))
    args = [{"TINY": str(tmp_path / "tiny"), "DATA": str(tmp_path / "d.npz")}.get(a, a) for a in args]
    assert nll_cli.main(args + ["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        nll_cli.main(["--data", "digits", "--estimate", "1"])


def test_collapsed_strata_standard_error():
    """Single-step strata are exact (no variance); the others pair up, a last odd one with the pair before."""
    from ddpm_fast.likelihood import _collapsed_strata_stderr

    vb = torch.tensor([[5.0, 2.0, 1.0, 0.5, 0.25]])
    assert float(_collapsed_strata_stderr(vb, [1, 1, 1, 1, 1])) == 0.0
    assert float(_collapsed_strata_stderr(vb, [1, 1, 3, 3, 1])) == pytest.approx(3 * 0.5)
    want = ((4 + 9) / 2 * 1.0**2 + (9 + 16) / 2 * 0.5**2) ** 0.5  # pairs of sizes (2, 3) and (3, 4)
    assert float(_collapsed_strata_stderr(vb, [1, 2, 3, 4, 1])) == pytest.approx(want)


def test_nll_batch_is_bounded_by_the_machines_memory(tmp_path, monkeypatch, capsys):
    """--batch-size beyond what fits (the model's cost estimate against half the memory) is capped, with a note."""
    from ddpm_fast import nll
    from ddpm_fast.loading import DEFAULT_MODEL, load_model

    config = load_model(DEFAULT_MODEL)[0].config
    params, act = config.cost()
    monkeypatch.setattr(nll, "machine_memory_bytes", lambda: int(2 * (4 * params + 7.5 * act)))
    seen = []
    real = nll.bits_per_dim
    monkeypatch.setattr(nll, "bits_per_dim", lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    assert nll.main(["--data", "digits", "--num-images", "1", "--estimate", "3", "--batch-size", "100000",
                     "--no-progress", "--out", str(tmp_path / "out")]) == 0
    assert seen == [7]
    err = capsys.readouterr().err
    assert "--batch-size 100000: about" in err and "ran 7 (image, t) rows per forward" in err


def test_nll_says_when_it_scored_converted_data(tmp_path, capsys):
    """RGB 20x20 images against the grayscale 16x16 model: the loader's notes are printed (as nll's own), the
    summary says the bound is of converted data, and data_notes.txt keeps the record beside bpd.csv."""
    import numpy as np
    from PIL import Image

    from ddpm_fast import nll

    folder = tmp_path / "rgb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    out = tmp_path / "out"
    args = ["--num-images", "1", "--estimate", "3", "--no-progress", "--out", str(out)]
    assert nll.main(["--data", str(folder), *args]) == 0
    captured = capsys.readouterr()
    assert "ddpm_fast.nll: note:" in captured.err and "converted 2 of 2 images to L" in captured.err
    assert "ddpm_fast.sample" not in captured.err
    assert "on converted data" in captured.out and "1 images: " in captured.out and "+- nan" not in captured.out
    assert "resized 2 of 2 images to 16x16" in (out / "data_notes.txt").read_text()
    assert nll.main(["--data", "digits", *args]) == 0  # unconverted data: no stale record of the earlier run
    captured = capsys.readouterr()
    assert not (out / "data_notes.txt").exists() and "on converted data" not in captured.out
    assert "replacing" in captured.err and "bpd.csv" in captured.err
