"""The embedded default model: `python -m ddpm_fast.sample` with no checkpoint draws recognizable digits."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import load_pretrained, load_schedule
from ddpm_fast import sample as sample_cli
from ddpm_fast.loading import DEFAULT_MODEL, EMBEDDED


def test_embedded_model_is_small_and_loads():
    files = os.listdir(DEFAULT_MODEL)
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL, f)) for f in files)
    assert size < 5 * 2**20, f"the embedded model should be a few MB at most, is {size / 2**20:.1f} MB"
    model = load_pretrained(DEFAULT_MODEL)
    assert model.config.num_classes == 10 and model.config.sample_size == 16
    assert load_schedule(DEFAULT_MODEL) is not None


def test_the_embedded_student_is_an_ordinary_checkpoint_that_says_how_it_samples(tmp_path, capsys):
    """digits-distilled (ddpm_fast.distill from digits): a v-prediction model whose scheduler config records its
    DDIM steps; sample runs them without flags, by name, and refuses other step counts of its sampler."""
    folder = EMBEDDED["digits-distilled"]
    schedule = load_schedule(folder)
    assert schedule.prediction_type == "v_prediction"
    student = schedule.student
    assert student["method"] == "progressive" and student["sampler"] == "ddim" and student["spacing"] == "trailing"
    model = load_pretrained(folder)
    assert model.config == load_pretrained(DEFAULT_MODEL).config  # the teacher's architecture
    steps = student["steps"][0]
    assert sample_cli.main(["--checkpoint", "digits-distilled", "--num-samples", "4", "--out", str(tmp_path / "s"),
                            "--no-progress"]) == 0
    assert f"ddim {steps} steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sample_cli.main(["--checkpoint", "digits-distilled", "--steps", str(steps + 1), "--out", str(tmp_path / "t")])
    assert "samples only those" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", [[], ["--sampler", "dpm++"], ["--sampler", "dpm++sde", "--order", "3"],
                                     ["--sampler", "dpm++", "--fp16"], ["--sampler", "dpm++", "--bf16"],
                                     ["--checkpoint", "digits-distilled"],
                                     ["--checkpoint", "digits-distilled", "--fp16"]])
def test_default_sampling_draws_the_asked_digits(tmp_path, sampler):
    """A classifier trained on scikit-learn's real digits must read the conditioning label back: with the
    default sampler, with DPM-Solver++ in its default 20 steps (2M, and the 3rd-order SDE), on the fast path (on a
    CPU: --fp16 is bf16 or fp32 channels_last by the CPU, --bf16 is bf16), and with the distilled student's own
    few DDIM steps."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    LogisticRegression = pytest.importorskip("sklearn.linear_model").LogisticRegression

    assert sample_cli.main(["--num-samples", "100", "--out", str(tmp_path), "--no-progress", *sampler]) == 0
    with np.load(tmp_path / "samples_100x16x16x1.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (100, 16, 16, 1) and sorted(set(labels.tolist())) == list(range(10))
    digits = load_digits()
    clf = LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x8 = F.interpolate(x, size=(8, 8), mode="area").flatten(1).numpy()
    accuracy = float((clf.predict(x8) == labels).mean())
    print(f"classifier agrees with the conditioning label on {accuracy:.0%} of samples")
    assert accuracy >= 0.8
    assert len({images[i].tobytes() for i in range(100)}) == 100, "samples must differ"
