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
