"""mmdist's built-in learning-rate schedules equal transformers.get_scheduler's, step by step."""

from __future__ import annotations

import pytest
import torch

from mmdist.training.schedule import BUILT_IN, build_scheduler


def _lrs(make, steps: int) -> list[float]:
    """Both groups' learning rates at each step, flattened."""
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-4}])
    scheduler = make(optimizer)
    out = []
    for _ in range(steps):
        out.extend(g["lr"] for g in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (1, 1), (5, 37)])
def test_built_in_schedules_equal_transformers(name, warmup, total):
    from transformers import get_scheduler

    ours = _lrs(lambda opt: build_scheduler(name, opt, warmup, total), total + 3)
    theirs = _lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total), total + 3)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0.0)


def test_other_names_go_to_transformers_and_unknown_ones_are_refused():
    ours = _lrs(lambda opt: build_scheduler("cosine_with_restarts", opt, 2, 12), 12)
    assert ours[2] == pytest.approx(0.5e-3) and ours[-2] < ours[4]  # group 0 at steps 1, 11 and 2
    with pytest.raises(ValueError, match="no_such_schedule"):
        build_scheduler("no_such_schedule", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0, 3)


def test_a_resumed_schedule_continues_where_it_stopped():
    params = [torch.nn.Parameter(torch.zeros(1))]
    first = torch.optim.SGD(params, lr=1.0)
    sched = build_scheduler("cosine", first, 2, 20)
    for _ in range(7):
        first.step()
        sched.step()
    state = sched.state_dict()
    second = torch.optim.SGD(params, lr=1.0)
    resumed = build_scheduler("cosine", second, 2, 20)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == sched.get_last_lr() and resumed.last_epoch == 7
