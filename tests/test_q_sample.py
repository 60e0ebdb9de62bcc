"""ops.q_sample (Triton) vs q_sample_ref; the in-kernel noise, statistically."""

import pytest
import torch
from conftest import DEVICES

from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.ops import q_sample, q_sample_ref

pytestmark = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", torch.device(DEVICES[-1])) is not None,
    reason="triton cannot run here",
)
SCHED = NoiseSchedule.cosine(1000)
TABLES = (SCHED.sqrt_alphas_cumprod, SCHED.sqrt_one_minus_alphas_cumprod)
TOLS = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 384, 17, 17), (5, 2, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_ref_with_given_noise(device, shape, dtype, channels_last):
    x0 = torch.randn(shape, device=device).to(dtype)
    noise = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x0, noise = (t.contiguous(memory_format=torch.channels_last) for t in (x0, noise))
    t = torch.randint(0, 1000, (shape[0],), device=device)
    with ops.use_backend("triton"):
        got, used = q_sample(x0, t, *TABLES, noise=noise)
    assert used is noise or torch.equal(used, noise)
    want = q_sample_ref(x0, t, *TABLES, noise)
    assert got.dtype == dtype
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise(device):
    shape = (4, 4, 32, 32)
    x0 = torch.randn(shape, device=device)
    t = torch.tensor([0, 100, 500, 999], device=device)
    with ops.use_backend("triton"):
        xt, z = q_sample(x0, t, *TABLES, seed=1234)
        xt2, z2 = q_sample(x0, t, *TABLES, seed=1234)
        _, z3 = q_sample(x0, t, *TABLES, seed=1235)
    # deterministic by seed, different across seeds, and the returned noise is the one used
    assert torch.equal(z, z2) and torch.equal(xt, xt2)
    assert not torch.equal(z, z3)
    torch.testing.assert_close(xt, q_sample_ref(x0, t, *TABLES, z), atol=1e-6, rtol=1e-5)
    flat = z.flatten().double()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs((flat ** 3).mean().item()) < 5 * (15 / n) ** 0.5  # symmetric
    assert abs((flat ** 4).mean().item() - 3) < 5 * (96 / n) ** 0.5  # Gaussian kurtosis
    for a, b in ((flat[:-1], flat[1:]), (z.flatten(1)[:, :-1].flatten().double(), z3.flatten(1)[:, :-1].flatten())):
        corr = torch.corrcoef(torch.stack([a, b.double()]))[0, 1].item()
        assert abs(corr) < 5 / n**0.5, "neighbouring elements (or seeds) must be uncorrelated"


def test_torch_backend_draws_from_seed():
    x0 = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    with ops.use_backend("torch"):
        a = q_sample(x0, t, *TABLES, seed=3)
        b = q_sample(x0, t, *TABLES, seed=3)
    assert torch.equal(a[1], b[1])


def test_bad_input():
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"t must be an integer tensor of shape \(2,\)"):
        q_sample(x0, torch.tensor([1]), *TABLES)
    with pytest.raises(RuntimeError, match=r"t must lie in \[0, 999\]"):  # checked on the device, no host read
        q_sample(x0, torch.tensor([1, 1000]), *TABLES)
    with pytest.raises(ValueError, match="noise shape"):
        q_sample(x0, torch.tensor([1, 2]), *TABLES, noise=torch.randn(2, 3, 4, 5))
