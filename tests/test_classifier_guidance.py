"""Classifier guidance (guided-diffusion's classifier_sample.py) against a float64 restatement of openai's
formulas (test_openai_sampling.OpenAIProcess): condition_mean in one ancestral step with the same noise,
condition_score in DDIM's step, whole guided DDIM runs with the classifier at openai's original timesteps, with
classifier-free guidance at the same time; every sampler takes a classifier; the step reads nothing back."""

import numpy as np
import pytest
import torch
from conftest import randomize_
from host_sync import no_host_sync
from test_openai_sampling import FLAGS, OpenAIProcess, _adm

from ddpm_fast import DDIMSampler, DDPMSampler, NoiseSchedule, UNet, UNetConfig, engine, ops
from ddpm_fast.classifier import ClassifierConfig, EncoderUNet, classifier_grad
from ddpm_fast.openai import config_from_flags
from ddpm_fast.samplers import SAMPLERS
from ddpm_fast.schedule import openai_timesteps


def _classifier(size=32, channels=3, classes=10, pool="attention", seed=0):
    torch.manual_seed(seed)
    cfg = ClassifierConfig(image_size=size, in_channels=channels, model_channels=32, num_res_blocks=1,
                           attention_ds=(2,), channel_mult=(1, 2), num_classes=classes, num_head_channels=32,
                           pool=pool)
    return randomize_(EncoderUNet(cfg).eval(), 0.05)


def _rel(got, want):
    want = torch.as_tensor(want, dtype=torch.float64)
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("respacing", ["", "10,5"])
@pytest.mark.parametrize("variance", ["learned_range", "fixed_large", "fixed_small"])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_one_guided_ancestral_step_equals_openai_condition_mean(respacing, variance, backend):
    if ops.backend_unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} backend not available here")
    _, schedule = config_from_flags(FLAGS, "improved-diffusion")
    keep = openai_timesteps(100, respacing) if respacing else list(range(100))
    sampler = DDPMSampler(schedule.respace(keep), variance=variance)
    openai = OpenAIProcess("cosine", 100, keep)
    g = torch.Generator().manual_seed(len(keep))
    n = len(keep)
    for i in (n - 1, n // 2, 1, 0):
        x = torch.randn(2, 3, 8, 8, generator=g) * 1.5
        out = torch.cat([torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1], 1)
        z = torch.randn(2, 3, 8, 8, generator=g)
        grad = torch.randn(2, 3, 8, 8, generator=g) * 3.0
        with ops.use_backend(backend):
            got = sampler.step(out, keep[i], x, noise=z, cond_grad=grad)
        want = openai.p_sample_guided(out.double().numpy(), x.double().numpy(), i, z.double().numpy(), variance,
                                      grad.double().numpy())
        assert _rel(got, want) < 1e-5, i
        unguided = openai.p_sample(out.double().numpy(), x.double().numpy(), i, z.double().numpy(), variance)
        if variance != "fixed_small" or i > 0:  # beta-tilde_0 = 0: no move on the last fixed_small step
            assert np.abs(want - unguided).max() > 1e-4


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_guided_ddim_step_equals_openai_condition_score(clip, eta):
    _, schedule = config_from_flags(FLAGS, "improved-diffusion")
    keep = openai_timesteps(100, "ddim10")
    sampler = DDIMSampler(schedule, timesteps=keep, eta=eta, clip_denoised=clip, use_clipped_model_output=True)
    openai = OpenAIProcess("cosine", 100, keep)
    if not clip:
        openai.pred_xstart = lambda x, eps, i: openai.sqrt_recip_acp[i] * x - openai.sqrt_recipm1_acp[i] * eps
    g = torch.Generator().manual_seed(3)
    for i in (9, 5, 0):
        x, eps, z = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
        grad = torch.randn(2, 3, 8, 8, generator=g)
        got = sampler.step(eps, keep[i], x, noise=z, cond_grad=grad)
        want = openai.ddim_sample_guided(eps.double().numpy(), x.double().numpy(), i, grad.double().numpy(), eta,
                                         z.double().numpy())
        assert _rel(got, want) < 1e-5, i


@pytest.mark.parametrize("spec", ["ddim10", "5,5"])
def test_guided_ddim_steps_and_run_equal_openai_with_the_original_timesteps(spec):
    """Our plan against openai's loop restated, the classifier's gradient (openai's cond_fn, classifier_grad)
    taken at each step's original timestep. Each step from our own state: 1e-5 relative, but 5e-5 at t = T-1
    of this cosine schedule, where x_0 = x_t / sqrt(alpha_bar) - ... multiplies float32 rounding by 160 (openai's
    float32 code has the same). The whole run (ddim10; 5,5's first step is such a step and a random model
    amplifies it): 1e-4."""
    model, schedule = _adm(FLAGS)
    clf = _classifier()
    keep = openai_timesteps(100, spec)
    sampler = DDIMSampler(schedule, timesteps=keep, use_clipped_model_output=True)
    openai = OpenAIProcess("cosine", 100, keep)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])

    def openai_step(x, i):
        t = torch.full((2,), keep[i])
        with torch.no_grad():
            eps = model(x.float(), t)[:, :3].double()
        grad = classifier_grad(clf, x.float(), t, y, 30.0).double()
        return torch.from_numpy(openai.ddim_sample_guided(eps.numpy(), x.numpy(), i, grad.numpy()))

    with ops.use_backend("torch"):
        plan = sampler.plan(model, x_T.shape, x_T=x_T, seed=0, class_labels=y, classifier=clf,
                            classifier_scale=30.0)
        x = x_T.double()
        for i in reversed(range(len(keep))):
            want = openai_step(plan.x.double(), i)
            plan.step()
            assert _rel(plan.x, want) < (5e-5 if keep[i] == 99 else 1e-5), keep[i]
            x = openai_step(x, i)
        plain = sampler.sample(model, x_T.shape, x_T=x_T, seed=0, progress=False)
    err = _rel(plan.x, x)
    print(f"{spec}: guided run, relative max |ours - openai| = {err:.2e}")
    if spec == "ddim10":
        assert err < 1e-4
    assert (plain.double() - x).abs().max() > 100 * min(err, 1e-5), "the classifier must move the run"


def test_classifier_and_classifier_free_guidance_together():
    """The digits model (class-conditional with a null label) with w = 2.5 and a 1-channel classifier: eps
    combined first, then conditioned; the same as the restated loop."""
    torch.manual_seed(0)
    model = randomize_(UNet(UNetConfig.from_name("digits")).eval(), 0.05)
    clf = _classifier(size=16, channels=1, classes=10)
    schedule = NoiseSchedule.linear(1000)
    keep = openai_timesteps(1000, "ddim6")
    sampler = DDIMSampler(NoiseSchedule.linear(1000), timesteps=keep, use_clipped_model_output=True)
    openai = OpenAIProcess("linear", 1000, keep)
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([4, 9])
    with ops.use_backend("torch"):
        got = sampler.sample(model, x_T.shape, x_T=x_T, seed=0, class_labels=y, guidance_scale=2.5,
                             classifier=clf, classifier_scale=2.0, progress=False)
        x = x_T.double()
        null = torch.full((2,), model.config.null_label)
        with torch.no_grad():
            for i in reversed(range(len(keep))):
                t = torch.full((2,), keep[i])
                e_c, e_u = model(x.float(), t, y).double(), model(x.float(), t, null).double()
                eps = e_u + 2.5 * (e_c - e_u)
                grad = classifier_grad(clf, x.float(), t, y, 2.0).double()
                x = torch.from_numpy(openai.ddim_sample_guided(eps.numpy(), x.numpy(), i, grad.numpy()))
    assert schedule.num_timesteps == 1000
    assert _rel(got, x) < 1e-4


@pytest.mark.parametrize("name, backend", [(n, "native") for n in sorted(SAMPLERS)]
                         + [("ddpm", "triton"), ("ddim", "triton")])
def test_every_sampler_takes_a_classifier_and_reads_nothing_back(name, backend):
    """Two guided plan steps of each sampler under the host-read guard (on the C++ backend): finite, and moved
    by the classifier. The class labels are the classifier's alone: the model is unconditional. On Triton (its
    interpreter here) the clipping samplers, whose guided step launches the unclipped kernel variant: recorded
    for the AOT compile."""
    if ops.backend_unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend} backend not available here")
    model = randomize_(UNet(UNetConfig.from_name("tiny", dropout=0.0)).eval(), 0.05)
    clf = _classifier(size=8, classes=5)
    cls = SAMPLERS[name]
    sampler = cls.from_request(NoiseSchedule.linear(1000), _request(cls))
    shapes = (2, 3, 8, 8)
    with ops.use_backend(backend):
        plan = sampler.plan(model, shapes, seed=7, class_labels=[1, 4], classifier=clf, classifier_scale=10.0)
        plain = sampler.plan(model, shapes, seed=7)
        with no_host_sync():
            plan.step()
            plan.step()
        plain.step()
        plain.step()
    assert torch.isfinite(plan.x).all() and not torch.equal(plan.x, plain.x)


def _request(cls):
    from ddpm_fast.samplers import SamplerRequest

    steps = max(cls.min_steps or 2, 6) if cls.default_steps is not None else None
    return SamplerRequest(steps=steps)


def test_guidance_errors_are_named():
    model = randomize_(UNet(UNetConfig.from_name("tiny", dropout=0.0)).eval(), 0.05)
    clf = _classifier(size=8, classes=5)
    sampler = DDIMSampler(NoiseSchedule.linear(1000), 4)
    with pytest.raises(ValueError, match="classifier guidance needs class_labels"):
        sampler.plan(model, (2, 3, 8, 8), seed=0, classifier=clf)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 4\]"):
        sampler.plan(model, (2, 3, 8, 8), seed=0, classifier=clf, class_labels=[1, 5])
    with pytest.raises(TypeError, match="classifier must be a classifier module"):
        sampler.plan(model, (2, 3, 8, 8), seed=0, classifier=object(), class_labels=[1, 2])
    with pytest.raises(ValueError, match="classifier_scale must be finite"):
        sampler.plan(model, (2, 3, 8, 8), seed=0, classifier=clf, class_labels=[1, 2], classifier_scale=float("nan"))
    with pytest.raises(ValueError, match="does not capture classifier guidance"):
        engine.GraphEngine().sample(sampler, model, (2, 3, 8, 8), seed=0, classifier=clf, class_labels=[1, 2])
    with pytest.raises(ValueError, match="cond_grad must have x_t's shape"):
        sampler.step(torch.randn(2, 3, 8, 8), sampler.timesteps[0].item(), torch.randn(2, 3, 8, 8),
                     cond_grad=torch.randn(2, 3, 4, 4))


# ---- the sample command -------------------------------------------------------------------------------------

ADM_FLAGS = "--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 32 --channel_mult 1,2"
CLF_FLAGS = ("--image_size 64 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 32 "
             "--classifier_pool adaptive")


@pytest.fixture(scope="module")
def openai_pair(tmp_path_factory):
    """An openai diffusion .pt and a guided-diffusion classifier .pt (random weights), 64x64."""
    from peers.openai_cases import random_state_dict

    from ddpm_fast.adm import ADMUNet
    from ddpm_fast.openai import classifier_config_from_flags

    root = tmp_path_factory.mktemp("openai_pair")
    config, _ = config_from_flags(ADM_FLAGS)
    shapes = {k: tuple(v.shape) for k, v in ADMUNet(config).state_dict().items()}
    torch.save(random_state_dict(shapes, 1), root / "64x64_diffusion.pt")
    clf = EncoderUNet(classifier_config_from_flags(CLF_FLAGS))
    shapes = {k: tuple(v.shape) for k, v in clf.state_dict().items()}
    torch.save(random_state_dict(shapes, 2), root / "64x64_classifier.pt")
    return root


def _sample(args, capsys):
    from ddpm_fast import sample as sample_cli

    code = sample_cli.main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_sample_cli_guides_an_openai_model_with_an_openai_classifier(openai_pair, tmp_path, capsys):
    """guided-diffusion's classifier_sample.py, restated: labels cycle through the classifier's classes and are
    kept in arr_1; the run is the Python API's with the same classifier."""
    base = ["--checkpoint", str(openai_pair / "64x64_diffusion.pt"), "--openai-flags", ADM_FLAGS,
            "--sampler", "ddim", "--steps", "3", "--num-samples", "3", "--seed", "5"]
    guide = ["--classifier", str(openai_pair / "64x64_classifier.pt"), "--classifier-flags", CLF_FLAGS,
             "--classifier-scale", "50"]
    code, out, err = _sample([*base, *guide, "--out", str(tmp_path / "g")], capsys)
    assert code == 0, err
    with np.load(next((tmp_path / "g").glob("samples_*.npz"))) as f:
        guided, labels = f["arr_0"], f["arr_1"]
    assert labels.tolist() == [0, 1, 2] and guided.shape == (3, 64, 64, 3)
    code, out, err = _sample([*base, "--out", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    with np.load(next((tmp_path / "plain").glob("samples_*.npz"))) as f:
        assert "arr_1" not in f and not np.array_equal(f["arr_0"], guided)
    code, out, err = _sample([*base, *guide, "--class-label", "7", "--out", str(tmp_path / "seven")], capsys)
    assert code == 0, err
    with np.load(next((tmp_path / "seven").glob("samples_*.npz"))) as f:
        assert f["arr_1"].tolist() == [7, 7, 7]


def test_sample_cli_guides_the_embedded_model_with_a_classifier_folder(tmp_path, capsys):
    """A classifier saved as a model folder, with classifier-free guidance at the same time."""
    from ddpm_fast.checkpoint import save_pretrained

    save_pretrained(_classifier(size=16, channels=1, classes=10), str(tmp_path / "clf"))
    code, out, err = _sample(["--classifier", str(tmp_path / "clf"), "--guidance-scale", "2", "--steps", "4",
                              "--num-samples", "4", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    with np.load(next((tmp_path / "o").glob("samples_*.npz"))) as f:
        assert f["arr_1"].tolist() == [0, 1, 2, 3]


def test_sample_cli_fp16_guides_on_the_fast_classifier(tmp_path, capsys):
    """--fp16 with --classifier runs the classifier's fast form too (its weights fixed: the guidance gradient is
    x's alone), and the images stay those of the fp32 run, to the fast path's rounding."""
    from ddpm_fast.checkpoint import save_pretrained

    save_pretrained(_classifier(size=16, channels=1, classes=10), str(tmp_path / "clf"))
    args = ["--classifier", str(tmp_path / "clf"), "--classifier-scale", "5", "--steps", "4", "--num-samples", "4"]
    code, out, err = _sample([*args, "--out", str(tmp_path / "fp32")], capsys)
    assert code == 0, err
    code, out, err = _sample([*args, "--fp16", "--out", str(tmp_path / "fast")], capsys)
    assert code == 0, err
    assert "classifier too" in out
    images = []
    for name in ("fp32", "fast"):
        with np.load(next((tmp_path / name).glob("samples_*.npz"))) as f:
            images.append(f["arr_0"].astype(np.int32))
    diff = np.abs(images[0] - images[1])
    print("max |fast - fp32| uint8 levels:", diff.max(), "mean:", diff.mean())
    assert diff.mean() < 2.0 and diff.max() <= 64


@pytest.mark.parametrize("extra, message", [
    (["--classifier-scale", "2"], "--classifier-scale needs --classifier PATH"),
    (["--classifier-flags", "--image_size 64"], "--classifier-flags needs --classifier PATH"),
    (["--classifier", "C", "--engine", "graph"], "does not capture classifier guidance"),
    (["--classifier", "C", "--classifier-scale", "inf"], "--classifier-scale must be finite"),
])
def test_classifier_usage_errors(extra, message, tmp_path, capsys):
    from ddpm_fast import sample as sample_cli

    with pytest.raises(SystemExit) as exc:
        sample_cli.main([*extra, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_classifier_errors_are_one_line(openai_pair, tmp_path, capsys):
    from ddpm_fast.checkpoint import save_pretrained

    model = ["--checkpoint", str(openai_pair / "64x64_diffusion.pt"), "--openai-flags", ADM_FLAGS, "--steps", "2",
             "--sampler", "ddim", "--num-samples", "2"]
    clf = ["--classifier", str(openai_pair / "64x64_classifier.pt")]
    save_pretrained(_classifier(size=32, classes=10), str(tmp_path / "clf32"))
    cases = [
        ([*model, *clf, "--classifier-flags", CLF_FLAGS.replace("32 --classifier_depth", "64 --classifier_depth")],
         "shape mismatches"),
        ([*model, *clf], "missing keys"),  # the default flags: attention pool, width 128
        ([*model, "--classifier", str(tmp_path / "clf32")], "takes 32x32 images with 3 channels; the model samples "
                                                             "64x64"),
        ([*model, *clf, "--classifier-flags", CLF_FLAGS, "--class-label", "1000"],
         r"--class-label must be in \[0, 999\]"),
        ([*model, "--classifier", str(openai_pair / "64x64_diffusion.pt"), "--classifier-flags", CLF_FLAGS],
         "missing keys"),
        (["--classifier", str(tmp_path / "nothing.pt")], "nothing.pt: no such file"),
    ]
    for args, message in cases:
        code, _, err = _sample([*args, "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and "\n" not in err and "Traceback" not in err, (args, err)
        import re

        assert re.search(message, err), (message, err)
