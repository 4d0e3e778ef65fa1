"""The measuring tools the benchmarks report with."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from common import cpu_peak_allocated_bytes  # noqa: E402

MB = 2**20


def test_cpu_peak_allocation_sees_a_short_lived_tensor_and_not_what_was_held_before():
    held = torch.empty(4 * MB // 4)  # allocated before: not counted

    def run():
        big = torch.empty(8 * MB // 4)  # float32: 8 MB, freed before the end
        small = torch.empty(1 * MB // 4)
        del big
        later = torch.empty(2 * MB // 4)
        return small, later

    assert cpu_peak_allocated_bytes(run) == 9 * MB
    assert held.numel() == MB


def test_cpu_peak_allocation_of_a_call_that_allocates_nothing_is_zero():
    x = torch.ones(10)
    assert cpu_peak_allocated_bytes(lambda: x.add_(x)) == 0  # in place: nothing new
