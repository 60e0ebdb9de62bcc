"""guided-diffusion's classifier (ddpm_fast.classifier, openai.load_openai_classifier) against openai's own
EncoderUNetModel: logits and guidance gradients recorded from it (tests/peers/make_openai_fixtures.py) for every
pool type, on random weights regenerated from the case's seed; the flags, the .pt loading and its errors."""

import copy

import pytest
import torch
from peers.openai_cases import CLASSIFIER_CASES, random_state_dict, read_fixture

from ddpm_fast.checkpoint import CheckpointError
from ddpm_fast.classifier import ClassifierConfig, EncoderUNet, classifier_grad
from ddpm_fast.openai import classifier_config_from_flags, load_openai_classifier


def _case(name):
    meta, tensors = read_fixture(name)
    clf = EncoderUNet(classifier_config_from_flags(meta["flags"])).eval()
    ours = {k: tuple(v.shape) for k, v in clf.state_dict().items()}
    assert ours == meta["shapes"], "our key layout differs from openai's"
    clf.load_state_dict(random_state_dict(meta["shapes"], meta["seed"]))
    return clf, tensors


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("name", sorted(CLASSIFIER_CASES))
def test_matches_openai_classifier(name):
    """Logits and the gradient of log_softmax(logits)[y] (openai's cond_fn at scale 1): 1e-5 relative."""
    clf, f = _case(name)
    with torch.no_grad():
        logits = clf(f["x"], f["t"])
    assert _rel(logits, f["logits"]) < 1e-5
    grad = classifier_grad(clf, f["x"], f["t"], f["y"])
    assert grad.shape == f["x"].shape and _rel(grad, f["grad"]) < 1e-5
    assert _rel(classifier_grad(clf, f["x"], f["t"], f["y"], scale=2.5), 2.5 * f["grad"]) < 1e-5


def test_load_openai_classifier_from_a_pt_file(tmp_path):
    name = "classifier_64_adaptive_plain"
    meta, f = read_fixture(name)
    path = tmp_path / "64x64_classifier.pt"
    torch.save(random_state_dict(meta["shapes"], meta["seed"]), path)
    clf = load_openai_classifier(path, meta["flags"])
    assert not clf.training
    with torch.no_grad():
        assert _rel(clf(f["x"], f["t"]), f["logits"]) < 1e-5
    with pytest.raises(CheckpointError, match=r"missing keys: out\.2\.c_proj\.bias"):  # the default pool: attention
        load_openai_classifier(path, meta["flags"].replace("--classifier_pool adaptive", ""))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_openai_classifier(path, meta["flags"].replace("--classifier_width 64", "--classifier_width 128"))


@pytest.mark.parametrize("flags, message", [
    ("--image_size 32", "create_classifier knows sizes"),
    ("--classifier_pool max", "pool must be one of"),
    ("--classifier_heads 4", "unknown classifier flag --classifier_heads"),
    ("--classifier_depth two", "--classifier_depth: expected a int"),
    ("--classifier_attention_resolutions 7", "each must divide image_size 64"),
])
def test_bad_classifier_flags_are_one_line(flags, message, tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=message):
        load_openai_classifier(path, flags)


def test_sampling_flags_in_the_classifier_string_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="ignores --classifier_scale"):
        cfg = classifier_config_from_flags("--image_size 128 --classifier_scale 1.0 --classifier_depth 1")
    assert cfg.channel_mult == (1, 1, 2, 3, 4) and cfg.num_res_blocks == 1 and cfg.pool == "attention"


def test_classifier_grad_checks_its_labels():
    clf = EncoderUNet(ClassifierConfig(image_size=8, model_channels=32, num_res_blocks=1, attention_ds=(2,),
                                       channel_mult=(1, 2), num_classes=5, num_head_channels=32)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises((ValueError, RuntimeError), match=r"class_labels must lie in \[0, 4\]"):  # _assert_async
        classifier_grad(clf, x, torch.tensor([3, 3]), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"integers of shape \(2,\)"):
        classifier_grad(clf, x, torch.tensor([3, 3]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="the classifier takes 8x8 images"):
        clf(torch.randn(2, 3, 16, 16), torch.tensor([3, 3]))


@pytest.mark.parametrize("name", sorted(CLASSIFIER_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_classifier_equals_its_reference(name, dtype):
    """to_fast: logits and the guidance gradient of the fast form (the ADM U-Net's fast blocks, channels_last, one
    time GEMM) against the fp32 reference on the same weights: fp32 to round-off (1e-4 relative); bf16 by the
    relative rule, no further from the fp32 reference than twice the reference computed in bf16 is."""
    clf, f = _case(name)
    fast = clf.to_fast(dtype)
    assert fast.compute_dtype == dtype and clf.compute_dtype is None
    assert fast.state_dict().keys() == clf.state_dict().keys()
    with torch.no_grad():
        want, got = clf(f["x"], f["t"]), fast(f["x"], f["t"])
    grad_want = classifier_grad(clf, f["x"], f["t"], f["y"])
    grad = classifier_grad(fast, f["x"], f["t"], f["y"])
    assert got.dtype == dtype and grad.shape == f["x"].shape and grad.dtype == torch.float32
    if dtype == torch.float32:
        bounds = (1e-4, 1e-4)
    else:
        half = copy.deepcopy(clf).to(dtype)
        with torch.no_grad():
            half_logits = half(f["x"].to(dtype), f["t"])
        half_grad = classifier_grad(half, f["x"].to(dtype), f["t"], f["y"])
        bounds = (2 * _rel(half_logits, want) + 1e-3, 2 * _rel(half_grad, grad_want) + 1e-3)
    print(f"{name} {dtype}: logits rel {_rel(got, want):.2e} (bound {bounds[0]:.2e}), gradient rel "
          f"{_rel(grad, grad_want):.2e} (bound {bounds[1]:.2e})")
    assert _rel(got, want) < bounds[0] and _rel(grad, grad_want) < bounds[1]
