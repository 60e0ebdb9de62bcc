"""FID (ddpm_fast.fid) against pytorch-fid's own code, on seeded random FID-Inception weights: the features, the
statistics, the distance and the command; every mix of inputs (images .npz, folder, statistics .npz); the fast
network (batch norms folded, channels-last) against the reference; one-line errors; torchrun sharding."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import diffusers_peer

diffusers_peer("pytorch_fid")  # CI requires it (DDPM_FAST_REQUIRE_DIFFUSERS=1); elsewhere a missing one skips
from pytorch_fid import fid_score  # noqa: E402
from pytorch_fid import inception as pfi  # noqa: E402

from ddpm_fast import fid  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore:Matrix is singular")  # scipy's sqrtm on few images


@pytest.fixture(scope="module")
def weights():
    return fid.random_weights(0)


@pytest.fixture()
def torch_home(tmp_path, monkeypatch, weights):
    """A TORCH_HOME whose hub cache holds the random weights under the real file name: pytorch-fid's own code
    and ours both find them there, as they would find the downloaded ones."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(weights, home / "hub" / "checkpoints" / fid.WEIGHTS_NAME)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _images(n, size, seed, smooth=False):
    g = np.random.default_rng(seed)
    x = g.integers(0, 256, (n, size, size, 3)).astype(np.float64)
    if smooth:  # another distribution: blurred and darker
        x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2)) / 3 * 0.7
    return x.round().astype(np.uint8)


def _write_folder(path, images):
    from PIL import Image

    path.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:04d}.png")
    return str(path)


def _write_npz(path, images):
    np.savez(path, images)
    return str(path)


def _fid_cli(args, capsys):
    code = fid.main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip()


def test_the_fast_network_equals_pytorch_fids_on_the_same_images(torch_home, weights, tmp_path):
    """2048-d features: ours (BN folded, channels-last, from an .npz) against pytorch-fid's get_activations
    (its InceptionV3 building itself from the cache, PNG files, its DataLoader)."""
    images = _images(6, 24, 1)
    folder = _write_folder(tmp_path / "a", images)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    theirs = fid_score.get_activations(files, pfi.InceptionV3([3]), batch_size=4, dims=2048, device="cpu",
                                       num_workers=0)
    net = fid.FeatureNet(2048)
    ours = torch.cat([net(torch.from_numpy(b)) for b in fid.NpzImages(_write_npz(tmp_path / "a.npz", images))
                      .batches(0, 6, 5)]).double().numpy()
    assert theirs.std() > 0.1 and np.isfinite(theirs).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("dims", [64, 768])
def test_the_fast_network_equals_the_reference(weights, dims):
    images = torch.from_numpy(_images(3, 19, dims))  # an odd size: the resize to 299 is not a plain zoom
    ref = fid.FeatureNet(dims, weights, fast=False)(images)
    fast = fid.FeatureNet(dims, weights, fast=True)(images)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_statistics_stream_to_numpys_mean_and_cov(weights):
    images = _images(23, 16, 3)
    net = fid.FeatureNet(64, weights)
    feats = net(torch.from_numpy(images)).double().numpy()
    for batch in (1, 7, 50):
        mu, sigma = fid.statistics(images, network=net, batch_size=batch)
        np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-10)


def test_grey_images_are_read_as_rgb(weights, tmp_path):
    """(N, H, W) and (N, H, W, 1) images, in memory or in an .npz (sample writes the digits model's that way),
    are repeated to RGB as PIL's convert("RGB") does for pytorch-fid."""
    grey = _images(5, 12, 9)[..., 0]
    net = fid.FeatureNet(64, weights)
    want = fid.statistics(np.repeat(grey[..., None], 3, axis=-1), network=net)
    for x in (grey, grey[..., None], fid.NpzImages(_write_npz(tmp_path / "g.npz", grey[..., None]))):
        got = fid.statistics(x, network=net, batch_size=2)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-14)


def test_frechet_distance_of_diagonal_gaussians():
    g = np.random.default_rng(0)
    mu1, mu2 = g.normal(size=5), g.normal(size=5)
    s1, s2 = g.uniform(0.5, 2, 5), g.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-9)
    with pytest.raises(fid.FIDError, match="different feature sizes"):
        fid.frechet_distance(mu1, np.diag(s1), mu2[:4], np.diag(s2[:4]))


def test_the_command_equals_pytorch_fid_for_every_mix_of_inputs(torch_home, tmp_path, capsys):
    """64-d features (40 and 36 images): pytorch-fid on two folders; ours on every
    mix of .npz, folder and statistics file; pytorch-fid reading our statistics file back."""
    a, b = _images(40, 16, 4), _images(36, 16, 5, smooth=True)
    dir_a, dir_b = _write_folder(tmp_path / "a", a), _write_folder(tmp_path / "b", b)
    npz_a, npz_b = _write_npz(tmp_path / "a.npz", a), _write_npz(tmp_path / "b.npz", b)
    want = fid_score.calculate_fid_given_paths([dir_a, dir_b], batch_size=32, device="cpu", dims=64, num_workers=0)
    assert want > 1.0
    stats_a = str(tmp_path / "a_stats.npz")
    code, out, _ = _fid_cli([npz_a, "--save-stats", stats_a, "--dims", "64", "--batch-size", "17"], capsys)
    assert code == 0 and out[-1].startswith("wrote")
    for pair in ((npz_a, npz_b), (dir_a, npz_b), (npz_a, dir_b), (stats_a, dir_b), (stats_a, npz_b)):
        code, out, err = _fid_cli([*pair, "--dims", "64"], capsys)
        assert code == 0, err
        got = float(out[-1].removeprefix("FID: "))
        assert got == pytest.approx(want, rel=1e-3), pair
    again = fid_score.calculate_fid_given_paths([stats_a, dir_b], batch_size=32, device="cpu", dims=64,
                                                num_workers=0)
    assert again == pytest.approx(want, rel=1e-3)


def test_one_line_errors(torch_home, tmp_path, capsys):
    small, other = _images(4, 16, 6), _images(4, 24, 7)
    npz_small, npz_other = _write_npz(tmp_path / "s.npz", small), _write_npz(tmp_path / "o.npz", other)
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "nostats.npz", mean=np.zeros(3))
    np.savez(tmp_path / "floats.npz", small.astype(np.float32))
    np.savez(tmp_path / "one.npz", small[:1])
    mixed = tmp_path / "mixed"
    _write_folder(mixed, small[:2])
    from PIL import Image

    Image.fromarray(other[0]).save(mixed / "9999.png")
    cases = [
        ([npz_small, str(tmp_path / "empty")], "empty: the folder holds no images"),
        ([npz_small, str(tmp_path / "nostats.npz")], r"nostats.npz: neither images \(arr_0\) nor statistics \(mu "
                                                      r"and sigma\): its arrays are mean"),
        ([npz_small, npz_other], "is 16x16 and .*o.npz is 24x24: an FID across sizes"),
        ([str(tmp_path / "floats.npz"), npz_small], "arr_0 must be uint8 images, got float32"),
        ([str(tmp_path / "one.npz"), npz_small], "at least 2 images"),
        ([str(mixed), npz_small], r"mixed: its images differ in size \(.*0000.png is 16x16, .*9999.png is 24x24\)"),
        ([npz_small, str(tmp_path / "missing.npz")], "missing.npz: no such file or folder"),
        ([npz_small, npz_small, "--inception-weights", str(tmp_path / "nope.pth")],
         "FID Inception weights not found: .*nope.pth is missing"),
    ]
    for args, message in cases:
        code, out, err = _fid_cli([*args, "--dims", "64"], capsys)
        assert code == 2 and "\n" not in err and "Traceback" not in err, (args, err)
        assert err.startswith("ddpm_fast.fid: error: "), err
        assert re.search(message, err), (message, err)
    code, out, err = _fid_cli([npz_small, npz_other, "--dims", "64", "--allow-different-sizes"], capsys)
    assert code == 0 and out[-1].startswith("FID: ")


def test_missing_weights_name_the_file_and_where_it_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nothing"))
    npz = _write_npz(tmp_path / "s.npz", _images(3, 8, 0))
    code, _, err = _fid_cli([npz, npz], capsys)
    assert code == 2 and "\n" not in err
    assert os.path.join(str(tmp_path / "nothing"), "hub", "checkpoints", fid.WEIGHTS_NAME) in err
    assert "--inception-weights" in err


def test_usage_errors_before_any_work(tmp_path, capsys):
    npz = _write_npz(tmp_path / "s.npz", _images(3, 8, 0))
    for args, message in (([npz], "give two inputs"), ([npz, npz, "--save-stats", "x.npz"], "give one input"),
                          ([npz, "--save-stats", str(tmp_path / "no" / "x.npz")], "does not exist"),
                          ([npz, npz, "--batch-size", "0"], "--batch-size must be positive")):
        with pytest.raises(SystemExit) as exc:
            fid.main(args)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_torchrun_shards_the_feature_pass(torch_home, tmp_path):
    """Two processes, each a share of the images, the sums all-reduced: the statistics of one process."""
    images = _images(11, 16, 8)
    npz = _write_npz(tmp_path / "a.npz", images)
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = ["--dims", "64", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "ddpm_fast.fid", npz, "--save-stats", one, *base], check=True, env=env,
                   cwd=os.sep, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ddpm_fast.fid", npz, "--save-stats", two, *base], env=env, cwd=os.sep,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(one) as a, np.load(two) as b:
        np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-10)
        np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-8, atol=1e-12)
