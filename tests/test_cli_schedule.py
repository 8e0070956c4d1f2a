"""The learning-rate schedule of ``oialr train``: linear warm-up, then cosine decay to 0."""
import math

import pytest

from oialr.cli.schedule import learning_rate
from oialr.cli.settings import TrainConfig


def test_linear_warmup_then_cosine_decay_to_zero():
    cfg = TrainConfig(lr=0.4)
    lrs = [learning_rate(cfg, step, total_steps=12, warmup_steps=4) for step in range(14)]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4] == pytest.approx(0.4)                                      # the decay starts at lr
    assert lrs[8] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 2)))  # half-way: lr / 2
    assert lrs[12:] == pytest.approx([0.0, 0.0])                             # past the end: stays at 0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_without_warmup_the_first_step_has_the_full_rate():
    assert learning_rate(TrainConfig(lr=0.1), 0, total_steps=10, warmup_steps=0) == pytest.approx(0.1)
