"""EMA: the warmup decay against hand-computed values and diffusers' EMAModel, and the update itself."""

import math

import pytest
import torch
from torch import nn

from ddpm.ema import EMA, ema_decay


def test_decay_matches_hand_computed_values():
    # min(max_decay, 1 - (1 + (n - 1) / inv_gamma) ** -power); the first update copies (decay 0).
    assert ema_decay(1) == 0.0
    assert ema_decay(2) == pytest.approx(1 - 2 ** -0.75)  # 0.40539644...
    assert ema_decay(2) == pytest.approx(0.4053964424)
    assert ema_decay(11) == pytest.approx(1 - 11 ** -0.75)  # 0.83443...
    assert ema_decay(101, inv_gamma=2.0, power=0.5) == pytest.approx(1 - 51 ** -0.5)
    assert ema_decay(10**9) == 0.9999  # capped by max_decay
    assert ema_decay(10**9, max_decay=0.99) == 0.99
    assert ema_decay(0) == 0.0


@pytest.mark.parametrize("inv_gamma, power, max_decay", [(1.0, 0.75, 0.9999), (2.0, 2 / 3, 0.999), (0.5, 1.0, 0.9)])
def test_decay_matches_diffusers_step_counting(inv_gamma, power, max_decay):
    from diffusers.training_utils import EMAModel

    reference = EMAModel([nn.Parameter(torch.zeros(1))], decay=max_decay, use_ema_warmup=True, inv_gamma=inv_gamma,
                         power=power)
    for step in [1, 2, 3, 10, 1000, 10**6]:
        assert ema_decay(step, max_decay, inv_gamma, power) == pytest.approx(reference.get_decay(step), abs=1e-15)


def test_update_follows_the_formula_and_diffusers():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, max_decay=0.9999, inv_gamma=1.0, power=0.75)
    reference = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        used = ema.step(model)
        reference.step(model.parameters())
        d = 0.0 if step == 1 else 1 - step_minus_one_pow(step)
        assert used == pytest.approx(d)
        assert ema.optimization_step == step
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
            torch.testing.assert_close(ema.shadow[n], expected[n])
    for (n, _), shadow in zip(model.named_parameters(), reference.shadow_params):
        torch.testing.assert_close(ema.shadow[n], shadow)


def step_minus_one_pow(step: int) -> float:
    return (1 + (step - 1)) ** -0.75


def test_copy_to_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    ema = EMA(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        ema.step(model)
    other = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    ema.copy_to(other)
    for n, p in other.named_parameters():
        assert torch.equal(p, ema.shadow[n])
    restored = EMA(other)
    restored.load_state_dict(ema.state_dict())
    assert restored.optimization_step == 3 and restored.decay == ema.decay
    for n in ema.shadow:
        assert torch.equal(restored.shadow[n], ema.shadow[n])
    # One more identical update on both gives identical shadows: the step count was restored.
    ema.step(model)
    restored.step(model)
    assert restored.decay == ema.decay == pytest.approx(1 - 4 ** -0.75)
    for n in ema.shadow:
        assert torch.equal(restored.shadow[n], ema.shadow[n])


def test_mismatched_state_is_a_clear_error():
    ema = EMA(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="do not match"):
        ema.copy_to(nn.Linear(3, 2, bias=False))
    state = EMA(nn.Linear(4, 2)).state_dict()
    with pytest.raises(ValueError, match="weight has shape"):
        ema.load_state_dict(state)
    with pytest.raises(ValueError, match="ema_power"):
        EMA(nn.Linear(1, 1), power=0)
    assert math.isclose(ema_decay(3, inv_gamma=1.0, power=1.0), 1 - 1 / 3)


def test_shadow_weights_stay_within_an_ulp_of_diffusers_through_the_warm_up():
    # train_unconditional.py's EMAModel (foreach=False): decay 0, then 1 - 2**-0.75, ... each step rounded as
    # s - (1 - d) * (s - p); ours is one lerp, rounded once per step differently: the error must not grow.
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.Linear(5, 7))
    ema = EMA(model)
    reference = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    params = list(model.parameters())
    for step in range(30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.01).mul_(0.999)
        ema.step(model)
        reference.step(model.parameters())
        for (name, _), expected in zip(model.named_parameters(), reference.shadow_params):
            torch.testing.assert_close(ema.shadow[name], expected, rtol=2.5e-7, atol=1e-8, msg=f"{step} {name}")
