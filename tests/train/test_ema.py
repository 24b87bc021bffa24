import math

import pytest
from torch import nn

from diffkit.train.ema import EMA


def _weights(value: float) -> nn.Module:
    net = nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(value)
    return net


def test_plain_decay_is_a_geometric_average():
    ema, live = EMA(_weights(1.0), 0.9), _weights(0.0)
    for _ in range(10):
        ema.update(live)
    assert ema.model.weight.item() == pytest.approx(0.9**10, rel=1e-6)


def test_rampup_caps_half_life_at_ratio_times_updates():
    # After n updates with ratio r the half-life is min(H, r n) updates: beta_n = 0.5 ** (1 / min(H, r n)).
    decay, r = 0.999, 0.05
    ema = EMA(_weights(1.0), decay, rampup=r)
    half_life = math.log(0.5) / math.log(decay)  # 692.8 updates
    assert ema.decay_at(100) == pytest.approx(0.5 ** (1 / 5))
    assert ema.decay_at(20_000) == pytest.approx(decay)  # r n = 1000 > H: the cap is off
    live, kept = _weights(0.0), 1.0
    for n in range(1, 2001):
        ema.update(live, n)
        kept *= 0.5 ** (1 / min(half_life, r * n))
    assert ema.model.weight.item() == pytest.approx(kept, rel=1e-5)
    # The initial weights are all but forgotten after 2000 updates; without the ramp-up 14% would remain.
    assert kept < 1e-9 and decay**2000 > 0.13


def test_rampup_needs_the_update_number_and_a_valid_ratio():
    with pytest.raises(ValueError, match="update's number"):
        EMA(_weights(1.0), 0.99, rampup=0.05).update(_weights(0.0))
    with pytest.raises(ValueError, match="ramp-up"):
        EMA(_weights(1.0), 0.99, rampup=-1)
