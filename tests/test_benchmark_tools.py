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


def test_the_probe_benchmark_runs_a_case_in_one_process_and_writes_its_json(tmp_path):
    # what benchmarks/gpu.sh runs on a GPU lease, here on the CPU with one small case
    import json
    import subprocess

    out = tmp_path / "probe.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probe.py")
    proc = subprocess.run([sys.executable, script, "--one-process", "--cases", "relu1d", "--methods",
                           "train_step,naive_reg,reg,reg_grad,projection,no_such_method", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["one_process"] is True
    relu = payload["results"]["relu1d"]
    for method in ("train_step", "naive_reg", "reg", "reg_grad", "projection"):
        assert relu[method]["seconds"] > 0 and relu[method]["step_seconds"] > 0, method
    assert abs(relu["reg"]["reg"] - relu["naive_reg"]["reg"]) <= 1e-5 * relu["naive_reg"]["reg"]
    assert "error" in relu["no_such_method"]  # recorded; the others went on


def test_the_device_check_runs_on_the_cpu_and_finds_the_fast_engine_exact(tmp_path):
    # what benchmarks/gpu.sh runs first on a GPU lease (the written-out second derivatives on
    # the device's kernels), here on the CPU
    import json
    import subprocess

    out = tmp_path / "check.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "device_check.py")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--cases",
                           "gn_cnn_channels_last,resnet_blocks,encoder_sequence_first", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["encoder_sequence_first", "gn_cnn_channels_last", "resnet_blocks"]
    assert all(error <= 1e-12 for r in results.values() for error in r.values()), results
