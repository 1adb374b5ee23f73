"""``TimeToTarget`` (issue 27, item 3): the first evaluation at or above a target accuracy, and
the training seconds (timed steps only) to it."""

from __future__ import annotations

import numpy as np
import pytest

from duogard import optim
from duogard.train import Evaluate, TimeToTarget, build_model, fit


def _feed(cb, records):
    cb.on_fit_start(None)
    for r in records:
        cb.on_step_end(None, r)
    return cb


def _records(accuracies: dict[int, float], steps: int = 10, dt: float = 0.5):
    """``steps`` records of ``dt`` seconds each; ``accuracies`` by step, where evaluated."""
    out = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 1.0, "time": 100.0 * s, "step_time": dt}
        if s in accuracies:
            r["test_accuracy"] = accuracies[s]
        out.append(r)
    return out


def test_the_first_evaluation_at_or_above_the_target_counts():
    """Equal counts as reached; a later, higher accuracy does not move it; the clock is the sum
    of the step times through that step (the records' wall-clock ``time`` is not used)."""
    cb = _feed(TimeToTarget(0.8), _records({2: 0.5, 4: 0.79, 6: 0.8, 8: 0.95, 10: 0.7}))
    assert (cb.step, cb.accuracy) == (6, 0.8)
    assert cb.seconds == pytest.approx(3.0)
    assert cb.summary() == {"target_accuracy": 0.8, "steps_to_target": 6, "seconds_to_target": cb.seconds}


def test_a_target_never_reached_is_none_and_a_new_run_starts_afresh():
    cb = _feed(TimeToTarget(0.9), _records({5: 0.3, 10: 0.89}))
    assert cb.step is None and cb.seconds is None and cb.accuracy is None
    assert cb.summary()["steps_to_target"] is None
    _feed(cb, _records({3: 0.95}, dt=1.0))  # the same callback in a second run
    assert (cb.step, cb.seconds) == (3, 3.0)
    _feed(cb, _records({}))  # and a third, which never evaluates
    assert cb.step is None


@pytest.mark.parametrize("target", [0, -0.1, 1.5, float("nan"), True, "0.9", None])
def test_bad_targets_are_refused(target):
    with pytest.raises(ValueError, match=r"TimeToTarget: target must be an accuracy in \(0, 1\]"):
        TimeToTarget(target)


def test_in_fit_it_reads_evaluate_and_times_the_steps(be, digits):
    """Under ``fit`` after an ``Evaluate(every=3)``: the step is the first evaluation at or above
    the target, the seconds the run's step times summed through it."""
    model = build_model("mlp", 10, hidden=(16,))
    params = model.init(0, digits.example_input)
    target = TimeToTarget(0.5)  # listed first: its order still runs it after Evaluate's
    res = fit(model, params, digits, backend=be.name, optimizer=optim.sgd(0.2), steps=30, batch_size=32,
              callbacks=[target, Evaluate(3)])  # fmt: skip
    accs = [(e["step"], e["test_accuracy"]) for e in res.evals]
    assert [s for s, _ in accs] == list(range(3, 31, 3))
    reached = [s for s, a in accs if a >= 0.5]
    assert reached, accs  # backprop at 0.2 gets there in 30 steps on digits
    assert target.step == reached[0] and target.accuracy == dict(accs)[reached[0]]
    times = [h["step_time"] for h in res.history]
    assert target.seconds == pytest.approx(float(np.sum(times[: target.step])), rel=1e-12)
    assert target.seconds < res.history[target.step - 1]["time"]  # evaluations are not on its clock
