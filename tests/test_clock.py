"""``Clock`` and ``find_device`` (pyro_mpt.clock)."""

import time

import torch

from pyro_mpt.clock import Clock, find_device


def test_laps_add_up_to_at_most_the_total():
    clock = Clock("cpu")
    time.sleep(0.01)
    first = clock.lap("first")
    second = clock.lap("second")
    timings = clock.total()
    assert first >= 0.01 and second >= 0.0
    assert list(timings) == ["first", "second", "total"]
    assert timings["first"] == first and timings["second"] == second
    assert timings["total"] >= first + second


def test_find_device_takes_the_first_tensor_anywhere_in_the_arguments():
    x = torch.zeros(2, device="meta")
    assert find_device((1, "a", [2, (x,)]), {}) == torch.device("meta")
    assert find_device((), {"data": {"X": x}}) == torch.device("meta")
    assert find_device((torch.zeros(1), x), {}) == torch.device("cpu")
    assert find_device((1, 2), {"k": None}) == torch.device("cpu")
