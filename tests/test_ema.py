"""The student EMA (`student_ema_decay`): the decay schedule and the average by hand, the swap in and out."""

import pytest
import torch

from decoupled_dmd.trainer.ema import StudentEma, ema_decay_at


@pytest.mark.parametrize("updates, expected", [(0, 0.1), (10, 11 / 20), (100, 101 / 110), (300, 0.97)])
def test_decay_warms_up_like_diffusers_then_holds(updates, expected):
    assert ema_decay_at(0.97, updates) == pytest.approx(expected)


def test_update_is_the_weighted_average_by_hand():
    weights = {"a": torch.tensor([1.0, -2.0])}
    ema = StudentEma(weights, decay=0.5)
    weights["a"].copy_(torch.tensor([3.0, 2.0]))
    assert ema.update(weights, updates=0) == pytest.approx(0.1)  # 0.1 * old + 0.9 * new
    torch.testing.assert_close(ema.shadow["a"], torch.tensor([2.8, 1.6]))
    weights["a"].copy_(torch.tensor([0.0, 0.0]))
    assert ema.update(weights, updates=50) == 0.5  # min(0.5, 51 / 60)
    torch.testing.assert_close(ema.shadow["a"], torch.tensor([1.4, 0.8]))


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
