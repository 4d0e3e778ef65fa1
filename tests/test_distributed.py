"""Label noise, training and the probe under torch.distributed: 2 spawned gloo processes."""

import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_workers as workers
from helpers import LSQR_RTOL, assert_rel_close, brute_jacobian, brute_reg_grad, mlp, svd_tangent_projection
from noisy_label_sgd import RegularizerProbe, implicit_regularizer, per_sample_sq_grad_norms, regularizer_grad

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2
DEADLINE_S = 120  # a test whose processes hang is killed and fails instead of hanging the suite


def spawn(fn, tmp_path, *args, tag="group"):
    init_file = str(tmp_path / f"{tag}.init")
    context = mp.spawn(fn, args=(WORLD, init_file, str(tmp_path), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):  # raises as soon as one process fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} did not finish within {DEADLINE_S} s")


def load(tmp_path, name):
    return [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("hook", ["loss", "output", "output_module"])
def test_ddp_training_keeps_ranks_identical_and_draws_differ(tmp_path, hook):
    spawn(workers.train, tmp_path, 6, hook)
    ranks = load(tmp_path, "train")
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert ranks[0]["noise_step"] == ranks[1]["noise_step"] == 6
    for d0, d1 in zip(ranks[0]["draws"], ranks[1]["draws"]):
        assert not torch.equal(d0, d1)
    if hook != "loss":
        return
    # same seed again: both ranks' streams reproduce exactly
    again = tmp_path / "again"
    again.mkdir()
    spawn(workers.train, again, 6, hook)
    for r0, r1 in zip(ranks, load(again, "train")):
        assert all(torch.equal(a, b) for a, b in zip(r0["draws"], r1["draws"]))


def test_ranks_draw_uncorrelated_noise(tmp_path):
    spawn(workers.noise_streams, tmp_path)
    r0, r1 = load(tmp_path, "noise")
    assert (r0["rank"], r1["rank"]) == (0, 1)  # picked up from torch.distributed
    a, b = r0["draws"][0], r1["draws"][0]
    corr = float(((a - a.mean()) * (b - b.mean())).sum() / (a.std() * b.std() * (a.numel() - 1)))
    assert abs(corr) < 5 / math.sqrt(a.numel())


def test_resume_from_a_rank0_checkpoint_is_bit_for_bit(tmp_path):
    full, first, second = (tmp_path / d for d in ("full", "first", "second"))
    for d in (full, first, second):
        d.mkdir()
    spawn(workers.train, full, 8, "loss")
    spawn(workers.train, first, 4, "loss", 0, 4)  # stops after 4 steps, rank 0 saves
    spawn(workers.train, second, 8, "loss", 4, None, str(first / "checkpoint.pt"))
    for r_full, r_resumed in zip(load(full, "train"), load(second, "train")):
        assert r_resumed["noise_step"] == 8
        for a, b in zip(r_full["params"], r_resumed["params"]):
            assert torch.equal(a, b)
        assert all(torch.equal(a, b) for a, b in zip(r_full["draws"][8:], r_resumed["draws"]))


def test_distributed_probe_equals_the_single_process_probe_on_the_union(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    y = torch.randn(10, 3, generator=g, dtype=torch.float64)
    bounds = [0, 6, 10]  # unequal shards
    spawn(workers.probe, tmp_path, x, y, bounds)
    single = RegularizerProbe(mlp(), x, y)()
    for report in load(tmp_path, "probe"):
        for name in ("reg", "reg_grad_norm", "loss"):
            assert_rel_close(getattr(report, name), getattr(single, name))
        # distributed LSQR against the single process's dense solve
        for name in ("manifold_grad_norm", "normal_grad_norm"):
            assert_rel_close(getattr(report, name), getattr(single, name), rtol=0, atol=LSQR_RTOL * single.reg_grad_norm)
        assert_rel_close(report.per_sample, single.per_sample)
    assert os.listdir(tmp_path / "tb_rank0") and not (tmp_path / "tb_rank1").exists()


@pytest.mark.parametrize("input_scale", [1.0, 0.3])
def test_distributed_projection_of_an_ill_conditioned_j_matches_the_svd(tmp_path, input_scale):
    # issue 14: conjugate gradients on K over 2 ranks were 1.1% off; LSQR over the shards of J
    # agrees with the SVD null space (cond(J) 6.5e3 at scale 1, 1.1e6 at scale 0.3)
    x = input_scale * torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spawn(workers.probe_manifold_grad, tmp_path, x, [0, 20, 32])
    model = workers.tanh_net()
    J = brute_jacobian(model, x)
    expected = svd_tangent_projection(J, brute_reg_grad(model, x), rank=32)
    for manifold in load(tmp_path, "manifold"):
        assert_rel_close(manifold, expected, rtol=1e-6)


def test_one_rank_raising_ends_the_job_with_its_error(tmp_path):
    start = time.monotonic()
    # the job reports whichever rank failed first: rank 1's bad input, or rank 0's collective
    # seeing its peer gone
    with pytest.raises(Exception, match="NaN or Inf|remote worker crashing|Connection closed"):
        spawn(workers.one_rank_fails, tmp_path)
    assert time.monotonic() - start < 60
    assert "NaN or Inf" in (tmp_path / "error_rank1.txt").read_text()


@pytest.mark.parametrize("wrapper", ["fsdp2", "fsdp2_group", "fsdp1", "fsdp1_flat"])
def test_an_fsdp_sharded_model_is_measured_as_the_unsharded_one(tmp_path, wrapper):
    # (grad reg read as zeros on both, and the probe under FSDP1 aborted the job in a collective)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    spawn(workers.sharded_measured, tmp_path, wrapper, x)
    reference = workers.doubled_head(mlp())
    norms = per_sample_sq_grad_norms(reference, x)
    grad = regularizer_grad(reference, x)
    projection = svd_tangent_projection(brute_jacobian(reference, x), torch.cat([g.flatten() for g in grad.values()]))
    report = RegularizerProbe(reference, x)()
    reference(x).pow(2).sum().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    reg_after_step = implicit_regularizer(reference, x)
    for result in load(tmp_path, "sharded"):
        for values in (result["norms"], *result["norms_by"].values()):
            assert_rel_close(values, norms, 1e-9)
        assert result["reg"] == pytest.approx(float(norms.mean()), rel=1e-9)
        assert result["grad"].keys() == grad.keys()
        for name, g in grad.items():
            assert_rel_close(result["grad"][name], g, 1e-9)
        flat = torch.cat([result["projection"][name].flatten() for name in grad])
        assert_rel_close(flat, projection, 1e-6)
        assert result["probe"][:2] == pytest.approx((report.reg, report.reg_grad_norm), rel=1e-9)
        assert result["probe"][2] == pytest.approx(report.manifold_grad_norm, rel=1e-6)
        if wrapper.startswith("fsdp2"):  # the parameters' own layout: DTensor shards of the same shapes
            assert result["layout"] == result["own_layout"]
            assert {kind for kind, _ in result["layout"].values()} == {"DTensor"}
        errors = result["errors"]
        assert "same inputs" in errors["different inputs"]
        assert "regularizer_grad" in errors["create_graph"]
        assert "unsharded replica" in errors["engine"]
        assert result["replica"] == ([type(m).__name__ for m in reference.modules()], 1)
        assert result["unchanged"]
        for name, p in reference.named_parameters():
            if result["loss_grad"] is not None:
                assert_rel_close(result["loss_grad"][name], p.grad, 1e-12)
        assert result["reg_after_step"] == pytest.approx(float(reg_after_step), rel=1e-9)
        assert abs(float(reg_after_step) / float(norms.mean()) - 1) > 1e-3  # (the step changed it)
    assert os.listdir(tmp_path / "tb_rank0") and not (tmp_path / "tb_rank1").exists()  # (logged once)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["stateless", "momentum"])
def test_a_dcp_save_load_and_continue_under_fsdp2_is_the_uninterrupted_run_bit_for_bit(tmp_path, momentum):
    # (the stream position was dropped by get_state_dict, and its state-creating step advanced it:
    # SGD without momentum has no state, so that step ran at every save and load)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    spawn(workers.fsdp_train, whole, 6, momentum)
    spawn(workers.fsdp_train, resumed, 6, momentum, 3)
    for a, b in zip(load(whole, "fsdp"), load(resumed, "fsdp")):
        assert a["noise_step"] == b["noise_step"] == 6
        assert b["warnings"] == []  # (no "no label-noise state" on loading)
        assert a["params"].keys() == b["params"].keys()
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
