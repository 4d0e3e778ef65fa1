"""The torch.func regularizer core against brute-force autograd loops, finite differences and SVD."""

import math

import pytest
import torch
from torch import nn

from helpers import (FAST_REFUSES_GRAD, NO_FAST_GRAD, LSQR_RTOL, FD_ATOL, FLOAT32_PROJECTION_RTOL, FLOAT64_RTOL, IDS, FrozenAndBuffers,
                     assert_rel_close, brute_jacobian, brute_reg_grad, brute_sq_norms, finite_difference_grad, make, mlp, norms_method,
                     random_vector, randn, seeded, svd_tangent_projection)
from noisy_label_sgd import (RegularizerProbe, implicit_regularizer, per_sample_sq_grad_norms, regularizer_grad,
                             tangent_projection)
from noisy_label_sgd.paper_models import MatrixSensing

@pytest.mark.parametrize("method", ["auto", "fast", "vmap"])
@pytest.mark.parametrize("name", IDS)
def test_per_sample_norms_and_reg_match_the_brute_force_loop(name, method):
    model, x = make(name)
    J = brute_jacobian(model, x)
    n = x.shape[0]
    expected = J.pow(2).reshape(n, -1).sum(1)
    assert_rel_close(per_sample_sq_grad_norms(model, x, method=method), expected)
    assert_rel_close(implicit_regularizer(model, x, method=method), expected.mean())


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("name", IDS)
def test_fast_path_in_groups_of_output_directions_matches_the_loop(name, size, monkeypatch):
    # the test models are small enough for one group; split the k directions as a large model would
    from noisy_label_sgd.engines import fast

    monkeypatch.setattr(fast, "direction_groups",
                        lambda owners, k, device: [range(s, min(s + size, k)) for s in range(0, k, size)])
    model, x = make(name)
    J = brute_jacobian(model, x)
    assert_rel_close(per_sample_sq_grad_norms(model, x, method="fast"), J.pow(2).reshape(x.shape[0], -1).sum(1))
    if name not in NO_FAST_GRAD:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        grad = regularizer_grad(model, x, method="fast")
        assert_rel_close(torch.cat([grad[n].reshape(-1) for n in names]), brute_reg_grad(model, x))


class BareScale(nn.Module):
    """A parameter used outside any child module, before them: every child's input needs a
    gradient, and the parent (a per-module fallback) ends at the model output, so a streamed
    backward would stop above the children."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.inner = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (addcmul: no rule; x * scale, or x * exp(scale), would have one)
        return self.head(torch.tanh(self.inner(torch.addcmul(torch.zeros_like(x), x, self.scale.exp()))))


STREAMED = ["inplace_relu_residual", "cnn_groupnorm", "transformer_encoder_layer", "conv1d_sequence_linear",
            "wide_conv1d", "mlp_multi_output", "layernorm_mlp"]


@pytest.mark.parametrize("name", STREAMED)
def test_one_direction_at_a_time_streams_through_the_backward(name, monkeypatch):
    # parts taken by hooks as the backward passes each module: the held path must not run
    from noisy_label_sgd.engines import fast

    def held(*args):
        raise AssertionError("took the held path")

    monkeypatch.setattr(fast, "held_part", held)
    monkeypatch.setattr(fast, "direction_groups", lambda owners, k, device: [range(j, j + 1) for j in range(k)])
    model, x = make(name)
    J = brute_jacobian(model, x)
    assert_rel_close(per_sample_sq_grad_norms(model, x, method="fast"), J.pow(2).reshape(x.shape[0], -1).sum(1))


@pytest.mark.parametrize("case", ["inputs_require_grad", "bare_parameter"])
def test_a_backward_that_cannot_stream_takes_the_held_path(case, monkeypatch):
    from noisy_label_sgd.engines import fast

    held = []
    original = fast.held_part
    monkeypatch.setattr(fast, "held_part", lambda *args: held.append(1) or original(*args))
    if case == "inputs_require_grad":  # no module input ends the backward
        model, x = make("mlp_multi_output")
        x.requires_grad_()
    else:
        model, x = seeded(19, BareScale), randn(6, 5)
    J = brute_jacobian(model, x.detach())
    assert_rel_close(per_sample_sq_grad_norms(model, x, method="fast"), J.pow(2).reshape(x.shape[0], -1).sum(1))
    assert held


@pytest.mark.parametrize("name", ["transformer_encoder_layer", "attention_sequence_first", "cross_attention_fallback",
                                  "encoder_causal_and_padding_masks"])
def test_float32_attention_norms_take_the_fused_kernels_without_warnings(name):
    # float32 is where the fused kernels run (norms only); per-module fallbacks stay on math
    import warnings

    model, x = make(name)
    expected = brute_jacobian(model, x).pow(2).reshape(x.shape[0], -1).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = per_sample_sq_grad_norms(model.float(), x.float())
    assert_rel_close(actual.double(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["transformer_encoder_layer", "attention_sequence_first",
                                  "attention_causal_and_padding_masks", "attention_weights_returned",
                                  "encoder_causal_and_padding_masks"])
def test_self_attention_is_traced_as_two_projections_and_the_module_restored(name):
    from noisy_label_sgd.engines.trace import trace

    model, x = make(name)
    model.eval()
    owners, h = trace(model, (x,))
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert [o.name.rsplit(".", 1)[-1] for o in owners if o.affine] == ["in_proj", "out_proj"] * len(attention)
    assert all("forward" not in vars(m) for m in attention)  # their own forward again
    assert_rel_close(h.detach().reshape(-1), model(x).detach().reshape(-1), rtol=1e-12)


@pytest.mark.parametrize("name", ["lstm_two_layers_batch_first", "gru_bidirectional_state_head",
                                  "rnn_relu_initial_state_no_bias", "lstm_projection_bidirectional_initial_state"])
def test_recurrent_layers_are_traced_as_their_affine_maps_one_call_per_time_step(name):
    from noisy_label_sgd.engines.trace import trace

    model, x = make(name)
    model.eval()
    owners, h = trace(model, (x,))
    rnn, steps = model.rnn, x.shape[1]
    suffixes = [f"_l{layer}{end}" for layer in range(rnn.num_layers) for end in ("", "_reverse")[:1 + rnn.bidirectional]]
    kinds = ["ih", "hh"] + (["hr"] if getattr(rnn, "proj_size", 0) else [])
    maps = {o.name: len(o.calls) for o in owners if o.affine}
    assert maps == {f"rnn.{kind}{suffix}": 1 if kind == "ih" else steps for suffix in suffixes for kind in kinds}
    assert "forward" not in vars(rnn)
    assert_rel_close(h.detach().reshape(-1), model(x).detach().reshape(-1), rtol=1e-12)


def test_a_shared_output_reduced_over_its_first_dim_is_not_expanded_but_followed_to_the_samples():
    # expanded to the batch, its sum over dim 0 would change the model: the trace sees that on
    # two samples and leaves it (before the sample dims were checked, the closed form added one
    # number to every sample: 1160x off); its per-sample gradients are taken where it meets the
    # samples, in the add (engines.shared)
    from helpers import SharedInput

    model, x = seeded(34, lambda: SharedInput(summed=True)), randn(70, 5, 4)
    for method in ("fast", "auto"):
        assert_rel_close(per_sample_sq_grad_norms(model, x, method=method), brute_sq_norms(model, x))
        assert_rel_close(flat(regularizer_grad(model, x, method=method)), brute_reg_grad(model, x))


@pytest.mark.parametrize("frozen", ["in_proj", "out_proj"])
def test_attention_with_a_frozen_projection_matches_the_loop(frozen):
    # out_proj frozen: in_proj alone in closed form; in_proj frozen: the attention module owns no
    # trainable parameter, its out_proj is used without being called, so "auto" takes vmap
    model, x = make("attention_sequence_first")
    for name, p in model.attn.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    J = brute_jacobian(model, x)
    assert_rel_close(per_sample_sq_grad_norms(model, x), J.pow(2).reshape(x.shape[0], -1).sum(1))
    grad = regularizer_grad(model, x)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert_rel_close(torch.cat([grad[n].reshape(-1) for n in names]), brute_reg_grad(model, x))


def test_output_direction_groups_hold_at_most_half_the_parameters():
    from noisy_label_sgd.engines.fast import direction_groups, traced

    model = seeded(18, lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)))
    params = sum(p.numel() for p in model.parameters())  # 82
    # per direction 6 n + 4 n floats of output gradients: as many directions as fit in 41 floats
    for n, size in ((1, 4), (2, 2), (3, 1)):
        owners, h = traced(model, (randn(n, 8),))
        groups = direction_groups(owners, h.shape[1], h.device)
        assert [list(g) for g in groups] == [list(range(s, min(s + size, 4))) for s in range(0, 4, size)]
        assert size * 10 * n <= params / 2 < (size + 1) * 10 * n or size == 4  # the most that fit
    # one direction's gradients over half the parameters: still one direction at a time
    owners, h = traced(model, (randn(10, 8),))
    assert [list(g) for g in direction_groups(owners, 4, h.device)] == [[0], [1], [2], [3]]


# models with a torch.func fallback somewhere: "fast" has no double backward there


@pytest.mark.parametrize("method", ["auto", "fast", "vmap"])
@pytest.mark.parametrize("name", IDS)
def test_reg_grad_matches_double_backward_of_the_loop(name, method):
    # these probe sets are small: "auto" forms J once (the small-Jacobian path)
    model, x = make(name)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "fast" and name in NO_FAST_GRAD:
        with pytest.raises(ValueError, match="method='fast' cannot differentiate"):
            regularizer_grad(model, x, method=method)
        return
    actual = regularizer_grad(model, x, method=method)
    assert list(actual) == names
    assert_rel_close(torch.cat([actual[n].reshape(-1) for n in names]), brute_reg_grad(model, x))


@pytest.mark.parametrize("method", ["auto", "fast", "vmap"])
@pytest.mark.parametrize("name", ["layernorm_mlp", "mlp_multi_output", "wide_conv2d_strided_dilated",
                                  "narrow_conv2d_strided_dilated", "cnn_partially_frozen",
                                  "transformer_encoder_layer", "attention_sequence_first"])
def test_reg_grad_matches_central_finite_differences(name, method):
    # LayerNorm: reverse-over-reverse under vmap was wrong there; "fast" double-backs through it
    model, x = make(name)
    grad = regularizer_grad(model, x, method=method)
    g = torch.Generator().manual_seed(0)
    reg = lambda: implicit_regularizer(model, x)
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            assert pname not in grad
            continue
        for idx in torch.randint(0, p.numel(), (3,), generator=g).tolist():
            fd = finite_difference_grad(reg, model, pname, idx)
            assert abs(grad[pname].reshape(-1)[idx].item() - fd) <= FD_ATOL * max(1.0, float(reg())), (pname, idx)


def test_matrix_sensing_closed_form():
    model, A = make("matrix_sensing")
    U = model.U.detach()
    sym = A + A.transpose(1, 2)
    closed = (sym @ U).pow(2).sum((1, 2))
    assert_rel_close(per_sample_sq_grad_norms(model, A), closed)


@pytest.mark.parametrize("name", ["sigmoid_single_point_tanh", "sigmoid_single_point_logistic"])
def test_sigmoid_single_point_closed_form(name):
    # Appendix C: reg = sum_i s(w_i.x)^2 + c_i^2 s'(w_i.x)^2 ||x||^2
    model, x = make(name)
    z = (model.w @ x[0]).detach()
    c = model.c.detach()
    if model.activation == "tanh":
        s, ds = torch.tanh(z), 1 - torch.tanh(z) ** 2
    else:
        s = torch.sigmoid(z)
        ds = s * (1 - s)
    closed = (s**2 + c**2 * ds**2 * x[0].pow(2).sum()).sum()
    assert_rel_close(implicit_regularizer(model, x), closed)


@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_chunking_and_memory_budget_do_not_change_the_numbers(method):
    model, x = make("mlp_multi_output")
    full = per_sample_sq_grad_norms(model, x, method=method)
    assert_rel_close(per_sample_sq_grad_norms(model, x, method=method, chunk_size=1), full, 1e-12)
    assert_rel_close(per_sample_sq_grad_norms(model, x, method=method, memory_budget=1), full, 1e-12)
    g_full = regularizer_grad(model, x, method=method)
    for kwargs in (dict(chunk_size=2), dict(memory_budget=1)):
        g_chunked = regularizer_grad(model, x, method=method, **kwargs)
        for n in g_full:
            assert_rel_close(g_chunked[n], g_full[n], 1e-12)


# -- tangent projection ----------------------------------------------------------------------


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def unflat(like, v):
    return {n: t.view_as(like[n]) for n, t in zip(like, torch.split(v, [p.numel() for p in like.values()]))}


PROJECTION_CASES = ["mlp_multi_output", "layernorm_mlp", "cnn_groupnorm", "matrix_sensing", "relu_1d",
                    "mlp_frozen_biases", "cnn_partially_frozen"]


@pytest.mark.parametrize("name", PROJECTION_CASES)
def test_projection_against_svd_null_space(name):
    model, x = make(name)
    J = brute_jacobian(model, x)
    v = random_vector(model)
    expected = svd_tangent_projection(J, flat(v))
    dense = flat(tangent_projection(model, x, v, solver="dense"))  # closed-form K where possible
    assert_rel_close(dense, expected)
    assert_rel_close(flat(tangent_projection(model, x, v, solver="dense", method="vmap")), expected)
    assert_rel_close(flat(tangent_projection(model, x, v, solver="lsqr")), expected, rtol=LSQR_RTOL)
    # J P_T v = 0 to rounding, and P_T is idempotent
    assert float((J @ dense).norm()) < FLOAT64_RTOL * float(J.norm() * flat(v).norm())
    assert_rel_close(flat(tangent_projection(model, x, unflat(v, dense))), dense)


def test_projection_with_dependent_rows_uses_the_pseudo_inverse():
    # a repeated sample makes J rank-deficient: K is singular, P_T must still be exact
    model, x = make("mlp_multi_output")
    x = torch.cat([x, x[:2]])
    J = brute_jacobian(model, x)
    v = random_vector(model, 1)
    expected = svd_tangent_projection(J, flat(v))
    assert torch.linalg.matrix_rank(J) == J.shape[0] - 6  # (two samples of three outputs repeated)
    assert_rel_close(flat(tangent_projection(model, x, v, solver="dense")), expected)
    assert_rel_close(flat(tangent_projection(model, x, v, solver="lsqr")), expected, rtol=LSQR_RTOL)


def designed_jacobian(singular_values, p=10, seed=3):
    """A bias-free Linear(p, 1) on inputs X = U diag(s) V^T: its J is X itself, with exactly the
    given singular values and known right singular vectors V."""
    n = len(singular_values)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(p, n, generator=g, dtype=torch.float64))[0]
    X = U @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ V.T
    model = nn.Linear(p, 1, bias=False).double()
    return model, X, V


def kept_rank_tolerance(s_max: float, s_kept: float, on_gram: bool = True) -> float:
    """Relative error of the dense projection along a kept direction of singular value s_kept
    (a margin of 100): K = J J^T resolves its eigenvalue s_kept^2 only to eps s_max^2; J itself
    (solved on J) its singular value s_kept to eps s_max."""
    return 100 * torch.finfo(torch.float64).eps * (s_max / s_kept) ** (2 if on_gram else 1)


@pytest.mark.parametrize("method", ["auto", "vmap"])  # K in closed form; J formed by torch.func
def test_the_default_cutoff_keeps_singular_values_above_it_and_drops_those_below(method):
    from noisy_label_sgd.engines.tangent import default_rcond

    cutoff = default_rcond(6, torch.float64)  # sqrt(n k eps) = 3.6e-8 relative to s_max
    # two clear directions, one 30x above the cutoff (kept), one 30x below (dropped): rank 3
    model, X, V = designed_jacobian([1.0, 0.5, 30 * cutoff, cutoff / 30, 0.0, 0.0])
    v = flat(random_vector(model))
    actual = flat(tangent_projection(model, X, unflat(random_vector(model), v), solver="dense", method=method))
    components = V.T @ actual
    # the kept one's: 1.7e-4 |v| through K, 2.1e-8 |v| solved on J
    error = kept_rank_tolerance(1.0, 30 * cutoff, on_gram=method == "auto") * float(v.norm())
    assert float(components[:3].abs().max()) <= error  # removed
    assert_rel_close(components[3:], V[:, 3:].T @ v, atol=error)  # left alone


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_the_probe_reports_the_rank_it_kept_and_the_smallest_kept_singular_value(method):
    from noisy_label_sgd.engines.tangent import default_rcond

    cutoff = default_rcond(6, torch.float64)
    model, X, _ = designed_jacobian([1.0, 0.5, 30 * cutoff, cutoff / 30, 0.0, 0.0])
    report = RegularizerProbe(model, X, method=method)()
    assert report.jacobian_rank == 3
    assert_rel_close(report.smallest_kept_singular_ratio, 30 * cutoff,
                     rtol=kept_rank_tolerance(1.0, 30 * cutoff, on_gram=method == "auto"))
    model, X, _ = designed_jacobian([2.0, 1.0, 0.5])  # full rank
    report = RegularizerProbe(model, X, method=method)()
    assert report.jacobian_rank == 3 and abs(report.smallest_kept_singular_ratio - 0.25) < 1e-12
    lsqr = RegularizerProbe(model, X, method=method, solver="lsqr")()  # no spectrum formed
    assert lsqr.jacobian_rank is None and lsqr.smallest_kept_singular_ratio is None


def spy_on_cholesky(monkeypatch, min_rows=0):
    """The dense solve on K from ``min_rows`` rows on tries the certified Cholesky solve; returns
    the lists of its verdicts (True: its solution was used) and of the solve's results."""
    from noisy_label_sgd.engines import tangent

    verdicts, projections = [], []
    certify, solve = tangent.certified_solve, tangent.project_on_gram
    monkeypatch.setattr(tangent, "CHOLESKY_MIN_ROWS", min_rows)
    monkeypatch.setattr(tangent, "certified_solve",
                        lambda *a: (lambda f: verdicts.append(f is not None) or f)(certify(*a)))
    monkeypatch.setattr(tangent, "project_on_gram",
                        lambda *a: (lambda p: projections.append(p) or p)(solve(*a)))
    return verdicts, projections


@pytest.mark.parametrize("singular_values,certified", [
    ([2.0, 1.0, 0.5], True),
    ([1.0, 0.5, "30 cutoffs"], True),    # all kept, the smallest 30x above the cutoff
    ([1.0, 0.5, "cutoff / 30"], False),  # one below it: the eigendecomposition drops it
    ([1.0, 0.5, 0.0], False),            # K singular
])
@pytest.mark.parametrize("scale", [1.0, 1e3])  # (the cutoff is relative to the largest)
def test_the_cholesky_solve_runs_only_where_every_eigenvalue_is_kept_and_agrees_with_the_svd(
        singular_values, certified, scale, monkeypatch):
    from noisy_label_sgd.engines.tangent import default_rcond

    cutoff = default_rcond(3, torch.float64)
    s = [scale * (30 * cutoff if x == "30 cutoffs" else cutoff / 30 if x == "cutoff / 30" else x)
         for x in singular_values]
    verdicts, projections = spy_on_cholesky(monkeypatch)
    model, X, V = designed_jacobian(s)
    v = random_vector(model)
    actual = flat(tangent_projection(model, X, v, solver="dense"))  # (K in closed form)
    assert verdicts == [certified]
    kept = [x for x in s if x > cutoff * s[0]]
    rank = len(kept)
    expected = flat(v) - V[:, :rank] @ (V[:, :rank].T @ flat(v))
    assert_rel_close(actual, expected, rtol=kept_rank_tolerance(s[0], min(kept)))
    assert int(projections[0].rank) == rank
    assert_rel_close(float(projections[0].smallest_kept_ratio), min(kept) / s[0],
                     rtol=kept_rank_tolerance(s[0], min(kept)))


def test_the_projection_through_the_blocked_row_gram_agrees_with_the_svd(monkeypatch):
    from noisy_label_sgd.engines import gram

    monkeypatch.setattr(gram, "SYMMETRIC_MIN_ROWS", 1)
    model, X, V = designed_jacobian([2.0, 1.0, 0.5])
    v = random_vector(model)
    expected = flat(v) - V @ (V.T @ flat(v))
    assert_rel_close(flat(tangent_projection(model, X, v, solver="dense")), expected, rtol=kept_rank_tolerance(2.0, 0.5))


def test_a_probe_set_past_the_cholesky_threshold_is_solved_by_it_as_the_svd(monkeypatch):
    from noisy_label_sgd.engines import tangent

    verdicts, _ = spy_on_cholesky(monkeypatch, tangent.CHOLESKY_MIN_ROWS)
    model = mlp(sizes=(20, 64, 1))  # p = 1409 parameters: J of 600 rows has full row rank
    x = torch.randn(600, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = random_vector(model)
    J = brute_jacobian(model, x)
    actual = flat(tangent_projection(model, x, v))
    assert verdicts == [True]
    assert_rel_close(actual, svd_tangent_projection(J, flat(v)))
    s = torch.linalg.svdvals(J)
    report = RegularizerProbe(model, x)()
    assert verdicts == [True, True] and report.jacobian_rank == 600
    assert_rel_close(report.smallest_kept_singular_ratio, float(s[-1] / s[0]), rtol=1e-8)  # (an upper bound: 4e-10 above it here)
    assert report.smallest_kept_singular_ratio >= float(s[-1] / s[0]) * (1 - 1e-12)


def test_an_explicit_cutoff_straddled_from_both_sides_gives_the_expected_rank():
    model, X, V = designed_jacobian([1.0, 3e-3, 3e-4, 0.0])
    v = random_vector(model, 2)
    for rcond, rank in ((0.7, 1), (1e-2, 1), (1e-3, 2), (1e-4, 3)):
        s_kept = [1.0, 3e-3, 3e-4][rank - 1]
        expected = flat(v) - V[:, :rank] @ (V[:, :rank].T @ flat(v))
        actual = flat(tangent_projection(model, X, v, solver="dense", rcond=rcond))
        assert_rel_close(actual, expected, rtol=kept_rank_tolerance(1.0, s_kept))


@pytest.mark.parametrize("name,kwargs,ran", [
    ("mlp_multi_output", dict(), "on_gram"),                    # K in closed form
    ("mlp_multi_output", dict(memory_budget=1000), "on_gram"),  # ... which never forms J
    ("mlp_multi_output", dict(solver="lsqr"), "lsqr"),
    ("mlp_multi_output", dict(method="vmap"), "on_jacobian"),   # J fits: formed, then solved on
    ("mlp_multi_output", dict(method="vmap", memory_budget=1000), "lsqr"),  # J does not fit: LSQR
    ("cnn_groupnorm", dict(), "on_jacobian"),                   # no closed-form K; J fits
    ("cnn_groupnorm", dict(memory_budget=1000), "lsqr"),
    ("cnn_groupnorm", dict(solver="dense", memory_budget=1000), "on_jacobian"),  # asked for: formed
    ("lstm_two_layers_batch_first", dict(), "on_jacobian"),     # affine maps over time: no K
])
def test_each_solver_is_reached_where_it_should_be(name, kwargs, ran, monkeypatch):
    from noisy_label_sgd.engines import tangent

    solved = []
    for solver in ("project_on_gram", "project_on_jacobian", "project_lsqr"):
        original = getattr(tangent, solver)
        monkeypatch.setattr(tangent, solver, lambda *a, s=solver, original=original: solved.append(s) or original(*a))
    model, x = make(name)
    v = random_vector(model)
    actual = flat(tangent_projection(model, x, v, **kwargs))
    assert solved == [f"project_{ran}"]
    assert_rel_close(actual, svd_tangent_projection(brute_jacobian(model, x), flat(v)),
                     rtol=LSQR_RTOL if ran == "lsqr" else FLOAT64_RTOL)


@pytest.mark.parametrize("accelerator,budget_rows,ran", [(True, 1.0, "on_gram"), (True, 0.9, "lsqr"),
                                                         (False, 1.0, "lsqr")])
def test_past_the_dense_row_limit_k_is_solved_dense_on_an_accelerator_where_it_and_its_factor_fit_the_budget(
        accelerator, budget_rows, ran, monkeypatch):
    # (on the CPU LSQR, whatever the budget: there the dense solve's arithmetic outgrew it)
    from noisy_label_sgd.engines import functional, tangent

    monkeypatch.setattr(tangent, "JACOBIAN_MAX_ROWS", 8)  # (the probe set has 24 rows: past it)
    monkeypatch.setattr(functional, "launch_bound", lambda device: accelerator)
    solved = []
    for solver in ("project_on_gram", "project_lsqr"):
        original = getattr(tangent, solver)
        monkeypatch.setattr(tangent, solver, lambda *a, s=solver, original=original: solved.append(s) or original(*a))
    model, x = make("mlp_multi_output")
    rows = x.shape[0] * model(x[:1]).numel()
    budget = int(budget_rows * 2 * 8 * rows**2)
    v = random_vector(model)
    actual = flat(tangent_projection(model, x, v, memory_budget=budget))
    assert solved == [f"project_{ran}"]
    assert_rel_close(actual, svd_tangent_projection(brute_jacobian(model, x), flat(v)),
                     rtol=LSQR_RTOL if ran == "lsqr" else FLOAT64_RTOL)


@pytest.mark.parametrize("name", IDS)
def test_lsqr_takes_every_product_from_one_forward_and_matches_the_svd(name, monkeypatch):
    # J^T u from one vjp's graph kept for the solve, J v from that pullback's vjp: the model's
    # forward runs once for all of them; the projection the SVD's
    from noisy_label_sgd.engines import tangent

    model, x = make(name)
    forwards, during = [], []
    original = tangent.project_lsqr

    def counted(products, *args):
        products.J_times = lambda v, J_times=products.J_times: during.append(1) or J_times(v)
        start = len(forwards)
        result = original(products, *args)
        during.append(len(forwards) - start)
        return result
    monkeypatch.setattr(tangent, "project_lsqr", counted)
    handle = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        v = random_vector(model)
        actual = flat(tangent_projection(model, x, v, method="vmap", solver="lsqr"))
    finally:
        handle.remove()
    # (on the scale of v: where J has full column rank the projection is 0)
    assert_rel_close(actual, svd_tangent_projection(brute_jacobian(model, x), flat(v)), rtol=LSQR_RTOL,
                     atol=LSQR_RTOL * float(flat(v).norm()))
    products, model_forwards = len(during) - 1, during[-1]
    assert products >= 2 and model_forwards == 1, (model_forwards, products)


def test_a_float32_jacobian_is_solved_through_k_in_float64(monkeypatch):
    # its own rounding exceeds what K adds above the cutoff; the QR on J costs 2.4-3x more
    from noisy_label_sgd.engines import tangent

    solved = []
    for solver in ("project_on_gram", "project_on_jacobian"):
        original = getattr(tangent, solver)
        monkeypatch.setattr(tangent, solver, lambda *a, s=solver, original=original: solved.append(s) or original(*a))
    model, x = make("cnn_groupnorm")
    v = random_vector(model)
    expected = svd_tangent_projection(brute_jacobian(model, x), flat(v))
    actual = flat(tangent_projection(model.float(), x.float(), {n: t.float() for n, t in v.items()}))
    assert solved == ["project_on_gram"]
    assert_rel_close(actual.double(), expected, rtol=FLOAT32_PROJECTION_RTOL)


def test_matrix_sensing_theory_check():
    """Complete measurements: reg = (2d+2)/n ||U||_F^2 = c tr(X*), constant on the manifold, so
    P_T grad reg = 0 there; with a few random measurements it is not."""
    d = 4
    model = MatrixSensing(d, init=randn(d, d, seed=11)).double()  # a generic point; X* = U U^T
    complete = torch.eye(d * d, dtype=torch.float64).reshape(d * d, d, d)  # every E_ab
    grad = regularizer_grad(model, complete)
    assert_rel_close(flat(grad), 2 * (2 * d + 2) / d**2 * model.U.detach().reshape(-1))
    manifold = flat(tangent_projection(model, complete, grad))
    assert float(manifold.norm()) < FLOAT64_RTOL * float(flat(grad).norm())
    partial = randn(5, d, d, seed=13)
    grad = regularizer_grad(model, partial)
    manifold = flat(tangent_projection(model, partial, grad))
    assert float(manifold.norm()) > 1e-1 * float(flat(grad).norm())


# -- bad input -------------------------------------------------------------------------------


def test_no_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        implicit_regularizer(model, randn(3, 6))


def test_empty_probe_set():
    with pytest.raises(ValueError, match="empty"):
        implicit_regularizer(mlp(), randn(0, 6))


class WrappedOutput(nn.Module):
    """A Linear whose output is passed through ``wrap`` (a non-tensor, a reduced batch...)."""

    def __init__(self, wrap):
        super().__init__()
        self.lin = nn.Linear(3, 1).double()
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.lin(x))


@pytest.mark.parametrize("wrap,error,message", [
    (lambda out: {"y": out}, TypeError, "must return a tensor of predictions, got dict"),
    (lambda out: out.sum(), ValueError, "leading sample dimension"),
])
def test_bad_model_outputs(wrap, error, message):
    with pytest.raises(error, match=message):
        implicit_regularizer(WrappedOutput(wrap), randn(2, 3))


def test_batchnorm_is_evaluated_in_eval_mode_and_batch_statistics_are_refused():
    model = seeded(3, FrozenAndBuffers)
    model.train()
    x = randn(6, 5)
    # eval-mode BatchNorm uses running statistics: samples are independent, and the loop agrees
    J = brute_jacobian(model, x)
    assert_rel_close(per_sample_sq_grad_norms(model, x), J.pow(2).reshape(6, -1).sum(1))
    assert model.training and model.bn.training  # mode restored
    model.bn = nn.BatchNorm1d(6, track_running_stats=False).double()
    with pytest.raises(ValueError, match="batch statistics even in eval mode.*GroupNorm"):
        implicit_regularizer(model, x)


def test_bad_projection_arguments():
    model, x = make("mlp_multi_output")
    v = random_vector(model)
    with pytest.raises(ValueError, match="Invalid solver: 'qr'"):
        tangent_projection(model, x, v, solver="qr")
    with pytest.raises(ValueError, match="missing"):
        tangent_projection(model, x, {k: v[k] for k in list(v)[1:]})
    with pytest.raises(TypeError, match="dict name -> tensor"):
        tangent_projection(model, x, flat(v))
    with pytest.raises(ValueError, match="Invalid chunk_size: 0"):
        per_sample_sq_grad_norms(model, x, chunk_size=0)


# -- the fast path: what it does itself and where it falls back --------------------------------


def test_fast_path_handles_closed_forms_without_fallback_and_reports_fallbacks():
    from noisy_label_sgd import RegularizerProbe

    for name in ("layernorm_mlp", "cnn_groupnorm", "conv1d_sequence_linear", "inplace_relu_residual",
                 "transformer_encoder_layer", "attention_sequence_first", "attention_causal_and_padding_masks",
                 "attention_weights_returned", "encoder_causal_and_padding_masks", "lstm_two_layers_batch_first",
                 "encoder_layer_sequence_first", "shared_input_and_positions",
                 "gru_bidirectional_state_head", "lstm_projection_bidirectional_initial_state",
                 "grouped_and_depthwise_conv", "batchnorm_eval"):
        model, x = make(name)
        assert RegularizerProbe(model, x, method="fast")().method == "fast", name
    for name, fell_back in (("reflect_padded_conv_fallback", "0"), ("cross_attention_fallback", "attn")):
        model, x = make(name)
        assert norms_method(model, x) == f"fast (per-module fallback: {fell_back})"
        with pytest.raises(ValueError, match=FAST_REFUSES_GRAD):  # (grad reg would be torch.func's)
            RegularizerProbe(model, x, method="fast")()


@pytest.mark.parametrize("name", IDS)
def test_probe_on_a_small_jacobian_matches_brute_force(name):
    # these probe sets have at most 64 output entries: the probe forms J once (method "jacobian")
    from noisy_label_sgd import RegularizerProbe

    model, x = make(name)
    report = RegularizerProbe(model, x)()
    assert report.method == "jacobian"
    J = brute_jacobian(model, x)
    assert_rel_close(report.per_sample, brute_sq_norms(model, x))
    grad = brute_reg_grad(model, x)
    manifold = svd_tangent_projection(J, grad)
    assert_rel_close(report.reg_grad_norm, float(grad.norm()))
    # a tangent part near zero (a single data point) is compared on the scale of grad reg
    assert_rel_close(report.manifold_grad_norm, float(manifold.norm()), atol=FLOAT64_RTOL * float(grad.norm()))
    assert_rel_close(report.normal_grad_norm, float((grad - manifold).norm()), atol=FLOAT64_RTOL * float(grad.norm()))


@pytest.mark.parametrize("name", ["tied_embedding_and_head", "tied_linears", "tied_linear_and_custom_module"])
def test_tied_parameters_on_the_fast_path_past_the_small_jacobian(name, monkeypatch):
    # 40 samples: past the small-J path; the cross terms of the tied uses make the fast engine
    # exact, the embedding-head pair in closed form, the others from per-sample gradients
    from noisy_label_sgd.engines import ties

    model, x = make(name)
    x = randn(40, *x.shape[1:], seed=12)
    pairs = []
    original = ties.embedding_linear_inner
    monkeypatch.setattr(ties, "embedding_linear_inner", lambda *a: pairs.append(1) or original(*a))
    custom = name == "tied_linear_and_custom_module"  # ("auto" takes vmap for it where J fits)
    J = brute_jacobian(model, x)
    if custom:  # the fast engine's norms past a J that fits (grad reg then torch.func's, refused by "fast")
        assert norms_method(model, x, "auto", memory_budget=4096) == "fast (per-module fallback: custom)"
        assert_rel_close(per_sample_sq_grad_norms(model, x, memory_budget=4096), J.pow(2).reshape(40, -1).sum(1))
    report = RegularizerProbe(model, x)()
    assert report.method == ("vmap" if custom else "fast")
    assert bool(pairs) == (name == "tied_embedding_and_head")
    grad = brute_reg_grad(model, x)
    assert_rel_close(report.per_sample, J.pow(2).reshape(40, -1).sum(1))
    assert_rel_close(report.reg_grad_norm, float(grad.norm()))
    assert_rel_close(report.manifold_grad_norm, float(svd_tangent_projection(J, grad).norm()),
                     rtol=0, atol=FLOAT64_RTOL * float(grad.norm()))
    if not custom:  # grad reg by double backward through the cross terms too
        names = [n for n, p in model.named_parameters()]
        fast = regularizer_grad(model, x, method="fast")
        assert_rel_close(torch.cat([fast[n].reshape(-1) for n in names]), grad)


def test_invalid_method():
    model, x = make("mlp_multi_output")
    with pytest.raises(ValueError, match="Invalid method: 'exact'"):
        per_sample_sq_grad_norms(model, x, method="exact")


@pytest.mark.parametrize("name", IDS)
def test_the_fast_engine_forms_j_from_its_trace_or_else_by_torch_func(name, monkeypatch):
    # from the trace: each owner's per-sample gradients (affine maps from their inputs and output
    # gradients, other modules by their own vjp); models the trace cannot take: torch.func
    from noisy_label_sgd.engines import fast, select_engine

    traced = []
    original = fast.FastEngine._traced_jacobian
    monkeypatch.setattr(fast.FastEngine, "_traced_jacobian", lambda self: traced.append(1) or original(self))
    model, x = make(name)
    engine = select_engine(model, x, "fast")
    with engine.measuring():
        J = engine.jacobian()
        assert engine.measurement.jacobian is J
    assert_rel_close(J, brute_jacobian(model, x))
    assert traced == [1]


@pytest.mark.parametrize("name", ["mlp_multi_output", "layernorm_mlp"])
def test_closed_form_gram_matrix(name):
    from noisy_label_sgd.engines import select_engine

    model, x = make(name)
    J = brute_jacobian(model, x)
    engine = select_engine(model, x, "fast")
    with engine.measuring():
        assert_rel_close(engine.gram(), J @ J.T)


def test_wide_convolutions_take_the_grouped_weight_gradient_where_it_is_faster(monkeypatch):
    # the two wide cases above check that path's numbers; this checks they reach it: on the CPU
    # when differentiated once more (grad reg), on an accelerator always; on the CPU the norms
    # alone take the patches
    from noisy_label_sgd.engines import closed_forms, functional

    calls = []
    grouped = closed_forms.conv_grouped
    monkeypatch.setattr(closed_forms, "conv_grouped", lambda *args: calls.append(1) or grouped(*args))
    for name in ("wide_conv2d_strided_dilated", "wide_conv1d"):
        model, x = make(name)
        calls.clear()
        per_sample_sq_grad_norms(model, x, method="fast")
        assert not calls, name
        regularizer_grad(model, x, method="fast")
        assert calls, name
        calls.clear()
        with monkeypatch.context() as accelerator:
            accelerator.setattr(functional, "launch_bound", lambda device: True)
            per_sample_sq_grad_norms(model, x, method="fast")
        assert calls, name


@pytest.mark.parametrize("name", ["cnn_groupnorm", "narrow_conv2d_strided_dilated", "narrow_conv1d_dilated"])
def test_conv_patches_one_sample_at_a_time_match_the_loop(name, monkeypatch):
    # the patches go a few samples at a time: here one; norms copy a strided view of the padded
    # input, the differentiable grad reg unfolds
    from noisy_label_sgd.engines import closed_forms

    monkeypatch.setattr(closed_forms, "patch_chunk_bytes", lambda device: 1)
    unfolds = []
    unfold = torch.nn.functional.unfold
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: unfolds.append(1) or unfold(*a, **k))
    model, x = make(name)
    n = x.shape[0]
    assert_rel_close(per_sample_sq_grad_norms(model, x, method="fast"), brute_jacobian(model, x).pow(2).reshape(n, -1).sum(1))
    assert not unfolds
    grad = regularizer_grad(model, x, method="fast")
    assert bool(unfolds) == (name != "narrow_conv1d_dilated")  # its only conv sees the model input
    assert_rel_close(torch.cat([g.reshape(-1) for g in grad.values()]), brute_reg_grad(model, x))


def test_the_fast_path_sizes_its_chunks_once_per_model_and_input_signature(monkeypatch):
    from noisy_label_sgd.engines import trace

    model, x = make("mlp_multi_output")
    traced = []
    record = trace.record
    monkeypatch.setattr(trace, "record", lambda owners, m, batch, *expand, **watched: traced.append(batch[0].shape[0])
                        or record(owners, m, batch, *expand, **watched))
    for _ in range(2):
        per_sample_sq_grad_norms(model, x, method="fast")
    # one layout (a forward of one sample and one of two), two traces
    assert traced.count(1) == 1 and traced.count(2) == 1 and traced.count(x.shape[0]) == 2
    next(model.parameters()).requires_grad_(False)  # another signature: laid out again
    norms = per_sample_sq_grad_norms(model, x, method="fast")
    assert traced.count(1) == 2 and traced.count(2) == 2
    assert_rel_close(norms, brute_jacobian(model, x).pow(2).reshape(x.shape[0], -1).sum(1))


def test_probe_with_cg_shares_one_small_jacobian_for_norms_and_grad():
    # solver="lsqr" leaves the probe's own small-J branch for norms_and_grad_with_method
    from noisy_label_sgd import RegularizerProbe

    model, x = make("relu_1d")
    report = RegularizerProbe(model, x, solver="lsqr")()
    assert report.method == "jacobian"
    assert_rel_close(report.per_sample, brute_jacobian(model, x).pow(2).sum(1))
    assert_rel_close(report.reg_grad_norm, float(brute_reg_grad(model, x).norm()))


@pytest.mark.parametrize("name", ["mlp_multi_output", "layernorm_mlp", "cnn_groupnorm", "transformer_encoder_layer",
                                  "matrix_sensing", "cnn_partially_frozen"])
def test_float32_grad_reg_and_every_solver_match_float64(name):
    import copy
    import warnings

    from helpers import FLOAT32_PROJECTION_RTOL, FLOAT32_RTOL

    model64, x64 = make(name)
    model32, x32 = copy.deepcopy(model64).float(), x64.float()
    s = torch.linalg.svdvals(brute_jacobian(model64, x64))
    assert bool(((s / s[0] > 1e-2) | (s / s[0] < 1e-12)).all())  # K's condition below 1e4 on range(J)
    for method in ("auto", "fast", "vmap"):
        if method == "fast" and name == "matrix_sensing":
            continue  # no closed forms: "fast" cannot differentiate it (tested above)
        g64, g32 = regularizer_grad(model64, x64, method=method), regularizer_grad(model32, x32, method=method)
        assert all(t.dtype == torch.float32 for t in g32.values())
        assert_rel_close(flat(g32), flat(g64), rtol=FLOAT32_RTOL)
    v64 = random_vector(model64)
    v32 = {n: t.float() for n, t in v64.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # LSQR meets its float32 tolerance (sqrt(eps))
        for kwargs in (dict(solver="dense"), dict(solver="dense", method="vmap"), dict(solver="lsqr")):
            p64 = flat(tangent_projection(model64, x64, v64, **kwargs))
            p32 = flat(tangent_projection(model32, x32, v32, **kwargs))
            assert_rel_close(p32, p64, rtol=0, atol=FLOAT32_PROJECTION_RTOL * float(flat(v64).norm()))


class Scale(nn.Module):
    """y = exp(w) * x elementwise, by addcmul: a layer the library has no closed form for, until
    one is registered (w * x, or exp(w) * x, would be followed to the product: a rule)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, d, dtype=torch.float64))

    def forward(self, x):
        return torch.addcmul(torch.zeros_like(x), self.weight.exp(), x)


def test_a_closed_form_registered_from_outside_is_used_and_differentiated(monkeypatch):
    # adding a layer touches one place: a registered function (here from a test, as a user would)
    from noisy_label_sgd.engines import closed_forms, register_closed_form

    model, x = seeded(30, lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Scale(4), nn.Linear(4, 2))), randn(40, 5)
    assert norms_method(model, x) == "fast (per-module fallback: 2)"
    monkeypatch.setattr(closed_forms, "CLOSED_FORMS", dict(closed_forms.CLOSED_FORMS))
    with pytest.raises(TypeError, match="needs contract="):
        register_closed_form(Scale)

    def scale_contract(module, a, g, trainable):  # the per-sample g * a exp(w), summed over samples
        return {"weight": (g * a * module.weight.exp()).sum(0)}

    @register_closed_form(Scale, contract=scale_contract)
    def scale_sq_norms(module, a, g, trainable, memo):  # d h / d w = g * a exp(w), per sample
        return (g * a * module.weight.exp()).pow(2).sum(-1).sum(0)

    report = RegularizerProbe(model, x)()
    assert report.method == "fast"  # no fallback, grad reg by the double backward
    assert_rel_close(report.per_sample, brute_sq_norms(model, x))
    assert_rel_close(report.reg_grad_norm, float(brute_reg_grad(model, x).norm()))


@pytest.mark.parametrize("input_scale", [1.0, 0.3])
def test_lsqr_reaches_an_ill_conditioned_projection_within_nk_iterations(input_scale, monkeypatch):
    # cond(J) = 6.5e3 at scale 1 (conjugate gradients on K stopped at their old cap of 74
    # iterations with the manifold gradient 7% off), 1.1e6 at scale 0.3 (tanh nearly linear):
    # LSQR on J with its row-space basis kept orthogonal ends within nk + 1 iterations, exact to
    # about 1e-14 cond(J), with no warning
    import warnings

    from noisy_label_sgd.engines import engine as engine_module

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        x = input_scale * torch.randn(32, 3, dtype=torch.float64)
    J = brute_jacobian(model, x)
    s = torch.linalg.svdvals(J)
    cond = float(s[0] / s[-1])
    assert (1e3 < cond < 1e5) if input_scale == 1.0 else (1e5 < cond < 1e8), cond
    grad = regularizer_grad(model, x)
    products = []
    original = engine_module.Engine.J_times
    monkeypatch.setattr(engine_module.Engine, "J_times", lambda self, v: products.append(1) or original(self, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # LSQR's "stopped after ... iterations"
        lsqr = flat(tangent_projection(model, x, grad, solver="lsqr"))
    assert len(products) <= 32 + 1  # (the start, then one per iteration)
    expected = svd_tangent_projection(J, flat(grad), rank=32)  # (every singular value above the cutoff)
    assert_rel_close(lsqr, expected, rtol=1e-14 * cond * 10)
    assert_rel_close(lsqr, expected, rtol=1e-6)  # (the bar)


def test_lsqr_warns_with_the_residual_when_it_stops_early():
    model, x = make("mlp_multi_output")
    with pytest.warns(UserWarning, match=r"LSQR stopped after 3 iterations at \|\|J r\|\| / \(\|\|J\|\| \|\|r\|\|\) = "):
        tangent_projection(model, x, random_vector(model), solver="lsqr", max_iter=3)
    with pytest.raises(ValueError, match="'cg' was replaced by 'lsqr'"):
        tangent_projection(model, x, random_vector(model), solver="cg")


class ReadsChildWeight(nn.Module):
    """A parent's forward uses a child's weight after calling the child (issue 14: 61% off)."""

    def __init__(self, embedding: bool):
        super().__init__()
        self.embedding = embedding
        self.inner = nn.Embedding(7, 4) if embedding else nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        z = torch.tanh(self.inner(x))
        if self.embedding:  # an output layer tied to the embedding, written in the parent
            z = z.mean(1)
            return self.head(z) + (z @ self.inner.weight.T).logsumexp(-1, keepdim=True)
        return self.head(z + x @ self.inner.weight.T).squeeze(-1)


@pytest.mark.parametrize("embedding", [False, True])
def test_a_parameter_used_outside_its_modules_call_is_never_silently_missed(embedding):
    model = seeded(31, lambda: ReadsChildWeight(embedding))
    x = torch.randint(0, 7, (70, 5), generator=torch.Generator().manual_seed(2)) if embedding else randn(70, 4)
    expected = brute_sq_norms(model, x)
    report = RegularizerProbe(model, x)()
    assert report.method == "vmap"  # the whole-model path, said in the report
    assert_rel_close(report.per_sample, expected)
    assert_rel_close(per_sample_sq_grad_norms(model, x), expected)
    with pytest.raises(ValueError, match="'inner' are also used outside its call"):
        per_sample_sq_grad_norms(model, x, method="fast")


def test_reading_a_childs_weight_shape_is_not_a_use():
    class ShapeReader(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(4, 3), nn.Linear(3, 1)

        def forward(self, x):  # metadata only: the closed forms still see every use
            return self.head(self.inner(x).reshape(-1, self.inner.weight.shape[0])).squeeze(-1)

    model, x = seeded(33, ShapeReader), randn(70, 4)
    report = RegularizerProbe(model, x)()
    assert report.method == "fast"
    assert_rel_close(report.per_sample, brute_sq_norms(model, x))


def test_a_module_using_its_own_weight_twice_falls_back_for_that_module_only():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4))

        def forward(self, x):  # the weight twice in one call: a per-module fallback is exact
            return torch.tanh(x @ self.weight.T) @ self.weight

    model = seeded(32, lambda: nn.Sequential(nn.Linear(4, 4), Twice(), nn.Linear(4, 1)))
    x = randn(70, 4)
    report = RegularizerProbe(model, x, memory_budget=4096)()  # (J not held: past "auto"'s vmap)
    assert report.method == "fast (per-module fallback: 1)"
    assert_rel_close(report.per_sample, brute_sq_norms(model, x))


AUTOCAST_CASES = ["mlp_multi_output", "cnn_groupnorm", "transformer_encoder_layer", "layernorm_mlp", "wide_conv1d",
                  "cross_attention_fallback", "reused_weight", "matrix_sensing"]


@pytest.mark.parametrize("name", AUTOCAST_CASES)
def test_every_method_runs_under_bfloat16_autocast_near_float32(name):
    # what mixed-precision training probes with (CPU bfloat16 here; CUDA's autocast follows the
    # same casting rules). The fast engine's norms compute in autocast's dtypes, within 3e-2 of
    # float32 (measured at most 6.2e-3); grad reg (a second derivative of a bfloat16 forward was
    # 8.6e-2 off on the transformer) and the vmap engine turn autocast off
    import copy

    model, x = make(name)
    model, x = copy.deepcopy(model).float(), torch.cat([x] * 10).float()
    for method in ("auto", "fast", "vmap"):
        norms32 = per_sample_sq_grad_norms(model, x, method=method)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norms = per_sample_sq_grad_norms(model, x, method=method)
            if method == "fast" and name in NO_FAST_GRAD:
                with pytest.raises(ValueError, match=FAST_REFUSES_GRAD):
                    RegularizerProbe(model, x, method=method)()
                assert_rel_close(norms, norms32, rtol=3e-2)
                continue
            report = RegularizerProbe(model, x, method=method)()
        assert norms.dtype == torch.float32 and report.per_sample.dtype == torch.float32
        assert_rel_close(norms, norms32, rtol=3e-2)
        assert_rel_close(report.per_sample, norms32, rtol=3e-2)
        assert math.isfinite(report.manifold_grad_norm) and report.manifold_grad_norm <= report.reg_grad_norm * (1 + 1e-6)
        if method == "fast" and name in NO_FAST_GRAD:
            continue
        grad32 = regularizer_grad(model, x, method=method)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grad = regularizer_grad(model, x, method=method)
        assert_rel_close(flat(grad), flat(grad32), rtol=3e-2)


@pytest.mark.parametrize("outputs", [1, 2])
def test_a_jacobian_too_large_to_form_gets_k_layer_by_layer_with_convolutions_in_channel_slices(outputs, monkeypatch):
    # J (40 k x 6722, 2.2-4.3 MB) over a 2 MB budget, the batch's trace within it: K accumulated
    # from each layer's per-sample gradients, a convolution's in slices of output channels (at
    # most a quarter of the budget each; one output: taken as the backward passes each layer),
    # then solved densely (issue 15: ResNet-18's projection ran LSQR, a jvp and a vjp per
    # iteration)
    from noisy_label_sgd.engines import closed_forms, fast, tangent

    model = seeded(46, lambda: nn.Sequential(nn.Conv2d(6, 24, 3, padding=1), nn.Tanh(), nn.Conv2d(24, 24, 3), nn.Tanh(),
                                             nn.Flatten(), nn.Linear(96, outputs)))
    x = randn(40, 6, 4, 4, seed=13)
    slices, solved = [], []
    grouped = closed_forms.grouped_weight_grads

    def spy(module, a, g, kernel, stride, padding, dilation, channels=slice(None)):
        slices.append((module.in_channels, channels))
        return grouped(module, a, g, kernel, stride, padding, dilation, channels)

    monkeypatch.setattr("noisy_label_sgd.engines.per_sample.grouped_weight_grads", spy)
    original = fast.FastEngine.gram_by_layers
    monkeypatch.setattr(fast.FastEngine, "gram_by_layers", lambda self: solved.append(1) or original(self))
    lsqr = tangent.project_lsqr
    monkeypatch.setattr(tangent, "project_lsqr", lambda *a: pytest.fail("LSQR ran") or lsqr(*a))
    v = random_vector(model)
    budget = 2 << 20 if outputs == 2 else 1 << 20
    actual = flat(tangent_projection(model, x, v, memory_budget=budget))
    assert solved == [1]
    conv2 = [c for cin, c in slices if cin == 24 and c != slice(None)]
    assert len(conv2) >= 4 and all(c.stop - c.start <= 3 * outputs for c in conv2), slices
    assert_rel_close(actual, svd_tangent_projection(brute_jacobian(model, x), flat(v)), rtol=1e-8)


@pytest.mark.parametrize("name", IDS)
def test_an_accelerators_choices_give_the_same_numbers(name, monkeypatch):
    # launch_bound: whole layers, all output directions in one batched backward (also with the
    # double backward of grad reg), made here on the CPU
    from noisy_label_sgd.engines import functional

    monkeypatch.setattr(functional, "launch_bound", lambda device: True)
    model, x = make(name)
    J = brute_jacobian(model, x)
    norms = per_sample_sq_grad_norms(model, x)
    assert_rel_close(norms, J.pow(2).reshape(x.shape[0], -1).sum(1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grad = regularizer_grad(model, x)
    assert_rel_close(torch.cat([grad[n].reshape(-1) for n in names]), brute_reg_grad(model, x))
    # (nothing returned holds a graph: it would keep the working set alive)
    assert norms.grad_fn is None and all(g.grad_fn is None for g in grad.values())


@pytest.mark.parametrize("name", ["cnn_groupnorm", "narrow_conv2d_strided_dilated"])
def test_channels_last_models_give_the_same_numbers(name):
    # a channels-last model and input (the written-out GroupNorm backward's kernel misread a
    # channels-last input beside a contiguous gradient: grad reg 1.7x off before it was made
    # contiguous)
    model, x = make(name)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J, expected = brute_jacobian(model, x), brute_reg_grad(model, x)
    model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    assert_rel_close(per_sample_sq_grad_norms(model, x, method="fast"), J.pow(2).reshape(x.shape[0], -1).sum(1))
    grad = regularizer_grad(model, x, method="fast")
    assert_rel_close(torch.cat([grad[n].reshape(-1) for n in names]), expected)


class BranchesOnItsInput(nn.Module):
    """A forward that reads each sample's value on the host (torch.func cannot vmap it)."""

    def __init__(self, read):
        super().__init__()
        self.linear, self.read = nn.Linear(3, 2), read

    def forward(self, x):
        return self.linear(x) if self.read(x) else -self.linear(x)


@pytest.mark.parametrize("read", [lambda x: bool((x > -1e9).all()), lambda x: x.sum().item() > -1e9,
                                  lambda x: float(x.sum()) > -1e9], ids=["bool", "item", "float"])
def test_a_forward_that_reads_values_is_refused_by_vmap_with_what_to_do_and_measured_by_auto(read):
    model = seeded(50, lambda: BranchesOnItsInput(read))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(ValueError, match="data-dependent control flow.*method='auto' or 'fast'"):
        per_sample_sq_grad_norms(model, x, method="vmap")
    assert_rel_close(per_sample_sq_grad_norms(model, x), brute_sq_norms(model, x))


class CountsNonzeros(nn.Module):
    """A forward with an operation of data-dependent shape: another vmap failure."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        counts = torch.tensor([float(row.nonzero().shape[0]) for row in x], dtype=x.dtype)
        return self.linear(x) * counts[:, None]


def test_another_vmap_failure_is_not_called_a_value_read():
    # (the diagnosis is the forward's own reads, not the error's text: this error stays as torch raised it)
    model = seeded(51, CountsNonzeros)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(RuntimeError) as raised:
        per_sample_sq_grad_norms(model, x, method="vmap")
    assert not isinstance(raised.value, ValueError)


@pytest.mark.parametrize("name", ["embedding_with_padding_index", "tied_embedding_and_head"])
def test_j_times_by_a_jvp_gives_the_padding_row_no_tangent(name):
    # J v by forward mode, J not held (a budget of one byte): the jvp's weights do not require
    # grad, and the padding row must be a constant there all the same, as reverse mode makes it
    from noisy_label_sgd.engines.vmap import VmapEngine

    model, x = make(name)
    engine = VmapEngine(model, (x,), None, 1)
    J = brute_jacobian(model, x)
    v, u = flat(random_vector(model)), torch.randn(J.shape[0], generator=torch.Generator().manual_seed(3),
                                                    dtype=J.dtype)
    with engine.measuring():
        assert not engine.jacobian_fits()
        assert_rel_close(engine.J_times(v), J @ v)
        assert_rel_close(engine.J_transpose_times(u), J.T @ u)
