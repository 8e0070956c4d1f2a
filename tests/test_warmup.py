"""The warm-up as a fraction of the run, and the warning of a run that ends still in the warm-up."""
import warnings

import pytest
import torch
from torch import nn

from oialr import OIALR, OIALRConfig
from models import batches, mlp


def run(config, total_steps, steps):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = OIALR(model, opt, config, total_steps=total_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches((8, 16), 4, steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ctl.step()
    return ctl, [str(w.message) for w in caught if "full-rank warm-up" in str(w.message)]


def test_fraction_of_the_run_sets_the_transition_step():
    ctl, warned = run(OIALRConfig(warmup_steps=0.4, update_every=100), total_steps=10, steps=10)
    assert ctl.transition_step == 4 and ctl.transition_reason == "warmup_steps=4 reached" and warned == []
    assert OIALRConfig(warmup_steps=0.01).warmup_for(10) == 1                    # at least one step


def test_run_ending_in_the_warmup_warns_once():
    ctl, warned = run(OIALRConfig(warmup_steps=12), total_steps=6, steps=8)
    assert ctl.phase == "full-rank"
    assert warned == ["OIALR: the run ends (step 6 of total_steps=6) still in the full-rank warm-up (warmup_steps=12): "
                      "no layer was converted; give a smaller warmup_steps, e.g. a fraction of the run such as 0.2"]
    assert run(OIALRConfig(warmup_steps=12), total_steps=None, steps=8)[1] == []


def test_fraction_needs_total_steps_and_total_steps_is_checked():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"warmup_steps=0.2 is a fraction of the run: give the controller total_steps "
                                         r"\(OIALR\(..., total_steps=N\)\) or set warmup_steps in steps"):
        OIALR(model, opt, OIALRConfig(warmup_steps=0.2))
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1 .* got 0"):
        OIALR(model, opt, OIALRConfig(), total_steps=0)
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer >= 0 .*, a fraction of the run in \(0, 1\)"):
        OIALRConfig(warmup_steps=1.0)
