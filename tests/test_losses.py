import numpy as np
import pytest
import torch
from conftest import randomize_

from ddpm_fast import NoiseSchedule, UNet, UNetConfig, training_loss


def test_loss_is_l_simple():
    model = randomize_(UNet(UNetConfig.from_name("tiny"))).eval()
    sched = NoiseSchedule.linear(100)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = training_loss(model, sched, x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    want = (model(x_t, t) - noise).square().mean()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)


def test_cond_drop_uses_null_label():
    model = UNet(UNetConfig.from_name("digits"))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    sched = NoiseSchedule.linear(100)
    x0 = torch.zeros(64, 1, 16, 16)
    labels = torch.randint(0, 10, (64,))
    training_loss(model, sched, x0, labels, cond_drop_prob=0.5)
    dropped = seen[-1] == 10
    assert 10 < int(dropped.sum()) < 54
    assert torch.equal(seen[-1][~dropped], labels[~dropped])
    training_loss(model, sched, x0, labels, cond_drop_prob=0.0)
    assert torch.equal(seen[-1], labels)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_name("tiny"))
    sched = NoiseSchedule.linear(100)
    x0 = torch.rand(16, 3, 8, 8).round() * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = training_loss(model, sched, x0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_bad_input():
    model = UNet(UNetConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="x0 must be"):
        training_loss(model, NoiseSchedule.linear(10), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        training_loss(model, NoiseSchedule.linear(10), torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))


def _np_vb(x0, x_t, eps, v, t, betas):
    """The bound's term at t (bits/dim per image) for learned_range, restated in float64 numpy from the formulas
    (posterior of eq. 6-7, learned_range interpolation, Gaussian KL, discretized decoder NLL at t = 0)."""
    import math

    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_log = np.log(np.append(post_var[1], post_var[1:]))
    c1, c2 = betas * np.sqrt(acp_prev) / (1 - acp), (1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp)
    out = []
    for i in range(x0.shape[0]):
        k = t[i]
        pred = np.sqrt(1 / acp[k]) * x_t[i] - np.sqrt(1 / acp[k] - 1) * eps[i]
        mean = c1[k] * pred + c2[k] * x_t[i]
        frac = (v[i] + 1) / 2
        log_var = frac * np.log(betas[k]) + (1 - frac) * post_log[k]
        true_mean = c1[k] * x0[i] + c2[k] * x_t[i]
        if k > 0:
            kl = 0.5 * (-1 + log_var - post_log[k] + np.exp(post_log[k] - log_var) + (true_mean - mean) ** 2
                        * np.exp(-log_var))
            out.append(kl.mean() / math.log(2))
        else:
            def cdf(z):
                return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
            inv = np.exp(-0.5 * log_var)
            hi, lo = cdf(inv * (x0[i] - mean + 1 / 255)), cdf(inv * (x0[i] - mean - 1 / 255))
            logp = np.where(x0[i] < -0.999, np.log(np.maximum(hi, 1e-12)),
                            np.where(x0[i] > 0.999, np.log(np.maximum(1 - lo, 1e-12)),
                                     np.log(np.maximum(hi - lo, 1e-12))))
            out.append(-logp.mean() / math.log(2))
    return np.array(out)


class _FixedOutput(torch.nn.Module):
    """A 'model' that returns a given (eps, v) output with its own parameters, to see the gradients."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out.clone())
        self.config = type("C", (), {"num_classes": None})()

    def forward(self, x, t, labels=None):
        self.seen = (x.detach().clone(), t.clone())
        return self.out * 1.0


def test_hybrid_loss_equals_the_formulas_on_the_same_noise():
    """L_hybrid = mean (eps - eps_theta)^2 + 0.001 * T * mean_i L_t(i), t drawn per image, L_0 the decoder NLL;
    the vlb term's gradient reaches v only (the mean is stopped)."""
    schedule = NoiseSchedule.cosine(40)
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (6, 3, 4, 4), generator=g).float() / 127.5 - 1)
    out = torch.cat([torch.randn(6, 3, 4, 4, generator=g), torch.rand(6, 3, 4, 4, generator=g) * 2 - 1], 1)
    model = _FixedOutput(out)
    loss = None
    for seed in range(50):  # until t = 0 is drawn for some image (its decoder term is then checked too)
        gen = torch.Generator().manual_seed(seed)
        loss = training_loss(model, schedule, x0, generator=gen)
        t = model.seen[1]
        if (t == 0).any():
            break
    assert (t == 0).any()
    gen = torch.Generator().manual_seed(seed)  # the same draws: t, then the noise
    t_again = torch.randint(0, 40, (6,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    assert torch.equal(t_again, t)
    x_t = model.seen[0].double().numpy()
    eps, v = out[:, :3].double().numpy(), out[:, 3:].double().numpy()
    mse = ((noise.double().numpy() - eps) ** 2).mean()
    vb = _np_vb(x0.double().numpy(), x_t, eps, v, t.numpy(), schedule.betas.numpy())
    want = mse + 0.001 * 40 * vb.mean()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    grad = model.out.grad
    # d/d eps comes from the MSE alone: 2 (eps - noise) / numel.
    torch.testing.assert_close(grad[:, :3], 2 * (out[:, :3] - noise) / noise.numel(), atol=1e-6, rtol=1e-4)
    assert grad[:, 3:].abs().sum() > 0  # and v learns from the bound
