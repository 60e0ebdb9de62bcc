"""python -m ddpm_fast.sample on openai checkpoints: --openai-flags, --openai-repo, --timestep-respacing."""

import numpy as np
import pytest
import torch
from peers.openai_cases import random_state_dict

from ddpm_fast import sample as sample_cli
from ddpm_fast.adm import ADMUNet
from ddpm_fast.openai import config_from_flags

FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 --learn_sigma True "
         "--diffusion_steps 100 --noise_schedule cosine")


@pytest.fixture
def openai_pt(tmp_path):
    config, _ = config_from_flags(FLAGS, "improved-diffusion")
    model = ADMUNet(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    path = tmp_path / "cifar10_small.pt"
    torch.save(random_state_dict(shapes, 0), path)
    return str(path)


def _run(args):
    return sample_cli.main(args + ["--no-progress", "--num-samples", "2", "--batch-size", "2"])


@pytest.mark.parametrize("sampler, extra, says", [
    ("ddim", ["--timestep-respacing", "ddim4"], "ddim 4 steps"),
    ("ddpm", ["--timestep-respacing", "3"], "ddpm (learned_range) 3 steps"),
    ("ddpm", ["--timestep-respacing", "3", "--variance", "fixed_large"], "ddpm (fixed_large) 3 steps"),
    ("ddim", ["--steps", "5", "--fp16"], "ddim 5 steps, fast path"),
])
def test_sample_an_openai_checkpoint(tmp_path, openai_pt, capsys, sampler, extra, says):
    out = tmp_path / "out"
    code = _run(["--checkpoint", openai_pt, "--openai-flags", FLAGS, "--openai-repo", "improved-diffusion",
                 "--sampler", sampler, "--out", str(out)] + extra)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert says in captured.out
    with np.load(out / "samples_2x32x32x3.npz") as f:
        assert f["arr_0"].shape == (2, 32, 32, 3)


def test_openai_cli_errors_are_one_line(tmp_path, openai_pt, capsys):
    cases = [
        (["--openai-flags", FLAGS + " --num_chanels 3"], "unknown improved-diffusion flag --num_chanels"),
        (["--openai-flags", FLAGS.replace("--num_channels 32", "--num_channels 64")],
         r"does not match the model config; shape mismatches: input_blocks.0.0.bias: checkpoint \(32,\) vs model "
         r"\(64,\) \(and \d+ more\)"),
        (["--openai-flags", FLAGS.replace("--learn_sigma True", "--learn_sigma False"), "--sampler", "ddpm",
          "--variance", "learned_range"], "missing keys|shape mismatches"),
    ]
    for extra, message in cases:
        code = _run(["--checkpoint", openai_pt, "--openai-repo", "improved-diffusion", "--out",
                     str(tmp_path / "o")] + extra)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_openai_flag_combinations_refused_by_the_parser(tmp_path, openai_pt, capsys):
    for extra in (["--openai-flags", FLAGS],  # no --checkpoint
                  ["--checkpoint", openai_pt, "--openai-flags", FLAGS, "--timestep-respacing", "ddim4", "--steps", "4"],
                  ["--checkpoint", openai_pt, "--openai-flags", FLAGS, "--timestep-respacing", "ddim4",
                   "--sampler", "dpm++"]):
        with pytest.raises(SystemExit) as info:
            _run(extra + ["--out", str(tmp_path / "o")])
        assert info.value.code == 2
    assert "--timestep-respacing" in capsys.readouterr().err
