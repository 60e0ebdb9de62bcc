"""Feature caching (DeepCache, ``cache_interval``): the U-Net's shallow/deep boundary, exact at N = 1, the whole
step every N steps otherwise, capture-safe steps, the graph engine's loops, the CLI flag."""

import warnings

import pytest
import torch
from conftest import randomize_

from ddpm_fast import DDIMSampler, DDPMSampler, DPMSolverSampler, NoiseSchedule, RunOptions, UNet, UNetConfig
from ddpm_fast import sample as sample_cli


def _model(fast):
    model = randomize_(UNet(UNetConfig.from_name("digits")).eval(), 0.05)
    return model.to_fast(torch.float32) if fast else model


@pytest.mark.parametrize("fast", [False, True])
def test_the_three_parts_are_the_whole_unet(fast):
    model = _model(fast)
    x, t, labels = torch.randn(3, 1, 16, 16), torch.tensor([5, 300, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        h, temb = model.prepare(x, t, labels)
        shallow, skips = model.encode_shallow(h, temb)
        parts = model.decode_shallow(model.deep(shallow, temb), skips, temb)
        assert torch.equal(parts, model(x, t, labels))
        assert len(skips) == model.config.num_res_blocks + 1, "the last up level reads conv_in and level 0's blocks"


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++"])
def test_interval_one_is_the_full_unet_exactly(fast, sampler):
    """N = 1 runs every step through the split (whole each time): the same bits as no caching, with guidance."""
    schedule = NoiseSchedule.linear(100)
    make = {"ddim": lambda: DDIMSampler(schedule, 8), "ddpm": lambda: DDPMSampler(schedule.respace(range(0, 100, 12))),
            "dpm++": lambda: DPMSolverSampler(schedule, 8)}[sampler]
    s, model = make(), _model(fast)
    run = dict(seed=3, class_labels=torch.tensor([0, 7, 4]), guidance_scale=2.0)
    plain = s.sample(model, (3, 1, 16, 16), progress=False, **run)
    cached = s.sample(model, (3, 1, 16, 16), progress=False, cache_interval=1, **run)
    assert torch.equal(plain, cached)


def test_interval_n_refreshes_every_n_steps_and_changes_the_rest(monkeypatch):
    schedule = NoiseSchedule.linear(100)
    model = _model(True)
    calls = []
    real = type(model).deep
    monkeypatch.setattr(type(model), "deep", lambda self, h, temb: calls.append(1) or real(self, h, temb))
    plan = DDIMSampler(schedule, 10).plan(model, (2, 1, 16, 16), seed=0, class_labels=torch.tensor([1, 2]),
                                          cache_interval=3)
    assert [plan.whole_step(i) for i in range(10)] == [True, False, False, True, False, False, True, False, False,
                                                       True]
    cached = plan.run()
    assert len(calls) == 4, "the deep branch runs on the whole steps only"
    full = DDIMSampler(schedule, 10).sample(model, (2, 1, 16, 16), seed=0, class_labels=torch.tensor([1, 2]),
                                            progress=False)
    assert not torch.equal(cached, full)
    # Reusing features of adjacent steps approximates the whole U-Net; it stays an image of the data range.
    assert bool(torch.isfinite(cached).all()) and float((cached - full).abs().mean()) < 0.5


@pytest.mark.parametrize("whole", [True, False])
def test_cached_steps_make_no_host_read(whole):
    from host_sync import no_host_sync

    plan = DDIMSampler(NoiseSchedule.linear(50), 5).plan(_model(True), (2, 1, 16, 16), seed=0,
                                                         class_labels=torch.tensor([1, 2]), guidance_scale=1.5,
                                                         cache_interval=2)
    plan.device_step(True)  # the first whole step allocates the feature buffer (before any capture)
    with no_host_sync():
        plan.device_step(whole)
    assert bool(torch.isfinite(plan.x).all())


def test_engine_loop_equals_the_eager_loop():
    """The graph engine's CPU form (the C++ loop over plan.step) picks the same whole/shallow steps."""
    from ddpm_fast import engine, ops

    if ops.extension() is None:
        pytest.skip("needs the extension's C++ loop")
    sampler, model = DDIMSampler(NoiseSchedule.linear(50), 7), _model(True)
    run = RunOptions(seed=1, class_labels=torch.tensor([3, 5]), cache_interval=3)
    with warnings.catch_warnings():  # its one-time notice (no CUDA device: the C++ loop)
        warnings.simplefilter("ignore", RuntimeWarning)
        via_engine = engine.GraphEngine().sample(sampler, model, (2, 1, 16, 16), run)
    assert torch.equal(via_engine, sampler.sample(model, (2, 1, 16, 16), run, progress=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_engine_alternates_two_graphs_on_gpu():
    from ddpm_fast import engine

    sampler = DDIMSampler(NoiseSchedule.linear(50), 7)
    model = randomize_(UNet(UNetConfig.from_name("digits")).eval(), 0.05).cuda().to_fast(torch.float16)
    run = RunOptions(seed=1, class_labels=torch.tensor([3, 5], device="cuda"), cache_interval=3)
    eng = engine.GraphEngine()
    got = eng.sample(sampler, model, (2, 1, 16, 16), run)
    assert torch.equal(got, sampler.sample(model, (2, 1, 16, 16), run, progress=False))
    assert len(eng._cache) == 1 and len(next(iter(eng._cache.values())).graphs) == 2


def test_bad_settings_are_refused(tmp_path, capsys):
    from ddpm_fast.adm import ADMConfig, ADMUNet

    for bad in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match=r"cache_interval must be an int in \[1, 1000\]"):
            RunOptions(cache_interval=bad)
    with pytest.raises(ValueError, match="cache_interval and batch_invariant cannot be combined"):
        RunOptions(cache_interval=2, batch_invariant=True)
    adm = ADMUNet(ADMConfig(image_size=8, model_channels=32, channel_mult=(1, 2), attention_ds=(2,)))
    with pytest.raises(ValueError, match="ADMUNet has no shallow/deep boundary"):
        DDIMSampler(NoiseSchedule.linear(20), 4).plan(adm, (1, 3, 8, 8), cache_interval=2)
    for flags, message in ((["--cache-interval", "0"], "--cache-interval must be in [1, 1000]"),
                           (["--cache-interval", "2", "--batch-invariant"], "cannot be combined")):
        with pytest.raises(SystemExit):
            sample_cli.main(flags + ["--out", str(tmp_path / "o")])
        assert message in capsys.readouterr().err


def test_cli_flag(tmp_path, capsys):
    out = tmp_path / "o"
    assert sample_cli.main(["--num-samples", "4", "--steps", "6", "--cache-interval", "3", "--no-progress",
                            "--out", str(out)]) == 0
    assert "deep features cached (whole U-Net every 3 steps)" in capsys.readouterr().out
    assert len(list(out.glob("*.npz"))) == 1


@pytest.mark.parametrize("steps, interval", [(4, 4), (4, 9), (2, 2)])
def test_an_interval_at_or_above_the_step_count_is_refused(steps, interval, tmp_path):
    """Every step but the first would reuse the first step's deep features: refused, by the plan and the CLI."""
    model = UNet(UNetConfig.from_name("tiny")).eval()
    sampler = DDIMSampler(NoiseSchedule.linear(100), steps)
    with pytest.raises(ValueError, match=f"cache_interval {interval} is not below the run's {steps} model"):
        sampler.plan(model, (1, 3, 8, 8), seed=0, cache_interval=interval)
    sampler.plan(model, (1, 3, 8, 8), seed=0, cache_interval=steps - 1)  # below: fine
    from ddpm_fast import sample as sample_cli

    code = sample_cli.main(["--sampler", "ddim", "--steps", str(steps), "--cache-interval", str(interval),
                            "--num-samples", "1", "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 2
