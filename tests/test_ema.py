"""The student EMA (`student_ema_decay`): the decay schedule and the average by hand, the swap in and out."""

import pytest
import torch

from decoupled_dmd.trainer.ema import StudentEma, ema_decay_at


@pytest.mark.parametrize("updates, expected", [(0, 0.0), (1, 0.5 * 0.5 / 0.75), (2, 0.5 * 0.75 / 0.875)])
def test_decay_by_hand(updates, expected):
    assert ema_decay_at(0.5, updates) == pytest.approx(expected)


def test_the_running_update_is_the_bias_corrected_average_of_all_weights_so_far():
    decay, values = 0.9, [3.0, -1.0, 4.0, 1.5, -2.0]
    weights = {"a": torch.tensor([values[0]])}
    ema = StudentEma(weights, decay)  # holds the start weights, which the first update replaces entirely
    for n, value in enumerate(values):
        weights["a"].copy_(torch.tensor([value]))
        ema.update(weights, updates=n)
        ages = range(n, -1, -1)  # the newest value has age 0
        expected = sum(decay ** age * v for age, v in zip(ages, values)) / sum(decay ** age for age in ages)
        assert ema.shadow["a"].item() == pytest.approx(expected, rel=1e-6)
    assert ema_decay_at(0.97, 300) == pytest.approx(0.97, abs=1e-4)  # the plain EMA once the start is forgotten


def test_applied_swaps_the_average_in_and_the_raw_weights_back_even_on_error():
    raw = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    weights = {"a": raw.detach()}  # live tensors sharing the parameter's storage, as Roles.trainable_state_dict
    ema = StudentEma(weights, decay=0.9)
    ema.shadow["a"].copy_(torch.tensor([5.0, 6.0]))
    with ema.applied(weights):
        assert raw.tolist() == [5.0, 6.0]
    assert raw.tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeError), ema.applied(weights):
        raise RuntimeError("sampling failed")
    assert raw.tolist() == [1.0, 2.0]


def test_a_state_of_another_student_is_refused():
    ema = StudentEma({"a": torch.zeros(2)}, decay=0.9)
    with pytest.raises(ValueError, match="missing \\['a'\\]"):
        ema.load_state_dict({"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="must be in"):
        StudentEma({"a": torch.zeros(2)}, decay=1.0)
