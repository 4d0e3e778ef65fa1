"""RegularizerProbe: the report against brute force, and no side effects on the model."""

import copy

import pytest
import torch
from torch import nn

from helpers import (LSQR_RTOL, FLOAT32_PROJECTION_RTOL, FLOAT32_RTOL, FLOAT64_RTOL, FrozenAndBuffers, assert_rel_close,
                     brute_jacobian, brute_reg_grad, brute_sq_norms, make, mlp, randn, svd_tangent_projection)
from noisy_label_sgd import ProbeReport, RegularizerProbe
from noisy_label_sgd.paper_models import MatrixSensing


def data(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def assert_matches_brute_force(report, model, x, y, rtol=FLOAT64_RTOL):
    """Every field of the report against the per-sample loop and the SVD null space (``rtol``
    for what went through an iterative solver: the tangent and normal parts)."""
    n = x.shape[0]
    norms = brute_sq_norms(model, x)
    assert_rel_close(report.reg, float(norms.mean()))
    assert_rel_close(report.per_sample, norms)
    grad = brute_reg_grad(model, x)
    manifold = svd_tangent_projection(brute_jacobian(model, x), grad)
    assert_rel_close(report.reg_grad_norm, float(grad.norm()))
    scale = rtol * float(grad.norm())  # the parts are compared on the scale of the whole
    assert_rel_close(report.manifold_grad_norm, float(manifold.norm()), rtol=0, atol=scale)
    assert_rel_close(report.normal_grad_norm, float((grad - manifold).norm()), rtol=0, atol=scale)
    with torch.no_grad():
        assert_rel_close(report.loss, float(nn.functional.mse_loss(model.eval()(x), y)))
    assert report.outputs_per_sample == y[0].numel() and report.per_sample.shape == (n,)
    assert report.seconds > 0 and 0 <= report.manifold_fraction <= 1


@pytest.mark.parametrize("solver", ["dense", "lsqr", "auto"])
def test_report_matches_brute_force(solver):
    model = mlp()
    x, y = data()
    report = RegularizerProbe(model, x, y, solver=solver)()
    assert isinstance(report, ProbeReport)
    assert_matches_brute_force(report, model, x, y, rtol=LSQR_RTOL if solver == "lsqr" else FLOAT64_RTOL)


@pytest.mark.parametrize("case,method", [("matrix_sensing", "auto"), ("matrix_sensing", "vmap"), ("mlp", "vmap")])
def test_one_jacobian_from_grad_reg_serves_norms_and_projection(case, method, monkeypatch):
    # J too large for the small-Jacobian path (over 64 rows), small enough for the dense solver:
    # the J formed by grad reg's forward-over-reverse gives the norms and the projection. (An
    # MLP under "auto" takes the fast engine: its closed forms need no J.)
    from noisy_label_sgd.engines import engine, vmap

    g = torch.Generator().manual_seed(1)
    if case == "matrix_sensing":
        # 70 measurements of a 12 x 12 symmetric X: grad reg = M U has a tangent part
        model = MatrixSensing(12, init=torch.randn(12, 12, generator=g)).double()
        x, y = torch.randn(70, 12, 12, generator=g, dtype=torch.float64), torch.randn(70, generator=g, dtype=torch.float64)
    else:
        model = mlp()
        x, y = data(n=30)
    monkeypatch.setattr(engine, "per_sample_jacobians", None)  # no second J
    monkeypatch.setattr(vmap.VmapEngine, "sq_norms", None)  # no separate norms
    report = RegularizerProbe(model, x, y, method=method)()
    assert report.method == "vmap" and report.manifold_fraction > 0.01
    assert_matches_brute_force(report, model, x, y)


def test_probe_changes_no_parameter_mode_gradient_or_random_state():
    model = FrozenAndBuffers().double()
    model.out.register_forward_pre_hook(lambda m, a: None)
    model.train()
    model.ln.eval()  # a mixed mode must come back as it was
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model(x).sum().backward()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    RegularizerProbe(model, x, torch.zeros(5, 2, dtype=torch.float64))()
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in grads)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n])


def test_probe_follows_the_current_parameters():
    model = mlp()
    x, _ = data()
    probe = RegularizerProbe(model, x)
    first = probe().reg
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert probe().reg != first
    assert probe().loss is None


def test_multiple_input_tensors():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(4, 2).double()

        def forward(self, u, v):
            return torch.tanh(self.a(u) * self.b(v))

    model = TwoInputs()
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    report = RegularizerProbe(model, (u, v))()
    assert_rel_close(report.per_sample, brute_sq_norms(model, (u, v)))


BAD_PROBES = [
    (lambda: (mlp(), data()[0], data()[1][:5]), {}, ValueError, "inputs have 7 samples but targets have 5"),
    (lambda: (mlp(), data()[0], data()[1]), {"solver": "lu"}, ValueError, "Invalid solver: 'lu'"),
    (lambda: (mlp(), data()[0][:0], None), {}, ValueError, "probe set is empty"),
    (lambda: (mlp().requires_grad_(False), data()[0], None), {}, ValueError, "no trainable parameters"),
    (lambda: (mlp(), (data()[0], data()[0][:3]), None), {}, ValueError, "disagree in their sample dimension"),
    (lambda: (mlp(), data()[0], [1.0]), {}, TypeError, "targets must be a tensor, got list"),
    (lambda: (mlp(), data()[0].index_fill(0, torch.tensor([2]), float("nan")), None), {}, ValueError,
     "input 0 holds NaN or Inf"),
    (lambda: (mlp(), data()[0], data()[1].index_fill(0, torch.tensor([1]), float("inf"))), {}, ValueError,
     "probe targets contain NaN or Inf"),
]


@pytest.mark.parametrize("make,kwargs,error,message", BAD_PROBES)
def test_bad_probe_input(make, kwargs, error, message):
    model, x, y = make()
    with pytest.raises(error, match=message):
        RegularizerProbe(model, x, y, **kwargs)


def test_targets_the_probe_cannot_use_are_refused_at_construction():
    x, y = data()
    with pytest.raises(ValueError, match="targets have 2 entries per sample but the model outputs 3"):
        RegularizerProbe(mlp(), x, y[:, :2])
    labels = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(TypeError, match="targets have dtype torch.int64.*mean squared error.*loss='auto' or 'cross"):
        RegularizerProbe(mlp(), x, labels, loss="mse")
    with pytest.raises(TypeError, match="loss='cross_entropy' takes integer class labels, got.*float"):
        RegularizerProbe(mlp(), x, y, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"Invalid loss: 'l1'"):
        RegularizerProbe(mlp(), x, y, loss="l1")
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\) \(or be -100"):
        RegularizerProbe(mlp(), x, labels.index_fill(0, torch.tensor([4]), 3))
    with pytest.raises(ValueError, match=r"labels of shape \[n, 2\] need logits of shape \[n, C, 2\].*outputs \[n, 3\]"):
        RegularizerProbe(mlp(), x, torch.zeros(len(x), 2, dtype=torch.long))
    with pytest.raises(RuntimeError):  # inputs the model cannot take fail at once, too
        RegularizerProbe(mlp(), x.float(), y)


def test_float_targets_of_another_precision_are_cast_to_the_outputs():
    x, y = data()
    model = mlp()
    report = RegularizerProbe(model, x, y.float())()
    with torch.no_grad():
        assert report.loss == float(nn.functional.mse_loss(model.eval()(x), y.float().double()))


def test_a_probe_on_a_model_with_a_per_module_fallback():
    # past the vmap engine's J ("auto", a small memory budget): the norms from the fast engine
    # with its per-module fallback, grad reg from the vmap engine, still exact; method="fast"
    # refuses that grad reg as regularizer_grad does
    from helpers import FAST_REFUSES_GRAD, make

    model, x = make("cross_attention_fallback")
    with pytest.raises(ValueError, match=FAST_REFUSES_GRAD):
        RegularizerProbe(model, x, method="fast")()
    x = torch.cat([x] * 24)  # (past the small J: 72 samples)
    report = RegularizerProbe(model, x, memory_budget=2048)()
    assert report.method == "fast (per-module fallback: attn)"
    assert_rel_close(report.reg, float(brute_sq_norms(model, x).mean()))
    assert_rel_close(report.reg_grad_norm, float(brute_reg_grad(model, x).norm()))


@pytest.mark.parametrize("name", ["lstm_two_layers_batch_first", "gru_bidirectional_state_head",
                                  "encoder_causal_and_padding_masks", "cross_attention_fallback"])
def test_recurrent_and_masked_models_on_a_probe_set_past_the_small_jacobian(name):
    # 70 samples: "auto" takes the fast engine (closed forms over time steps, masked attention)
    # or, for cross-attention, its per-module fallback; "vmap" the written-out layers under vmap
    model, x = make(name)
    x = randn(70, *x.shape[1:], seed=3)
    y = torch.zeros(70, model.eval()(x[:1])[0].numel(), dtype=torch.float64)
    for method in ("auto", "vmap"):
        report = RegularizerProbe(model, x, y, method=method)()
        assert report.method.startswith("fast" if method == "auto" else "vmap"), report.method
        assert_matches_brute_force(report, model, x, y.reshape(model(x).shape))


FLOAT32_CASES = [("mlp_multi_output", 6, "auto"), ("mlp_multi_output", 6, "lsqr"), ("layernorm_mlp", 6, "dense"),
                 ("layernorm_mlp", 6, "lsqr"), ("cnn_groupnorm", 20, "auto"), ("cnn_groupnorm", 20, "lsqr"),
                 ("relu_1d", 6, "auto"), ("matrix_sensing", 6, "lsqr"), ("transformer_encoder_layer", 6, "auto"),
                 ("transformer_encoder_layer", 6, "lsqr"), ("mlp_frozen_biases", 6, "auto")]


@pytest.mark.parametrize("name,n,solver", FLOAT32_CASES)
def test_float32_report_matches_float64_of_the_same_model(name, n, solver):
    # the same parameters and inputs in float32, as float32 training would probe them; n = 20
    # takes the fast engine, n = 6 the jacobian engine (or fast where the solver is LSQR)
    model64, x64 = make(name)
    x64 = torch.cat([x64] * (n // x64.shape[0] + 1))[:n] + 0.1 * torch.randn(
        n, *x64.shape[1:], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y64 = torch.randn(n, *model64.eval()(x64[:1]).shape[1:], generator=torch.Generator().manual_seed(6),
                      dtype=torch.float64)
    # the tolerance holds where J's nonzero singular values stay above 1e-2 s_max (float32
    # resolves K's eigenvalues to eps32 s_max^2): every such case, checked here
    s = torch.linalg.svdvals(brute_jacobian(model64, x64))
    assert bool(((s / s[0] > 1e-2) | (s / s[0] < 1e-12)).all()), s / s[0]
    model32 = copy.deepcopy(model64).float()
    r64 = RegularizerProbe(model64, x64, y64, solver=solver)()
    r32 = RegularizerProbe(model32, x64.float(), y64.float(), solver=solver)()
    assert r32.per_sample.dtype == torch.float32 and r32.method == r64.method
    assert_rel_close(r32.per_sample, r64.per_sample, rtol=FLOAT32_RTOL)
    for field in ("reg", "reg_grad_norm", "loss"):
        assert_rel_close(getattr(r32, field), getattr(r64, field), rtol=FLOAT32_RTOL)
    scale = FLOAT32_PROJECTION_RTOL * r64.reg_grad_norm
    assert_rel_close(r32.manifold_grad_norm, r64.manifold_grad_norm, rtol=0, atol=scale)
    assert_rel_close(r32.normal_grad_norm, r64.normal_grad_norm, rtol=0, atol=scale)


@pytest.mark.parametrize("name,n", [("mlp_multi_output", 30), ("mlp_multi_output", 6), ("reused_weight", 30),
                                    ("matrix_sensing", 12), ("matrix_sensing", 70), ("cnn_groupnorm", 8),
                                    ("tied_embedding_and_head", 10), ("lstm_two_layers_batch_first", 8)])
def test_the_report_and_the_functions_hold_no_graph(name, n):
    # a tensor with a graph would keep the double backward's whole working set alive
    from noisy_label_sgd import per_sample_sq_grad_norms, regularizer_grad

    model, x = make(name)
    x = torch.cat([x] * (n // x.shape[0] + 1))[:n]
    report = RegularizerProbe(model, x)()
    assert report.per_sample.grad_fn is None and not report.per_sample.requires_grad, report.method
    assert per_sample_sq_grad_norms(model, x).grad_fn is None
    assert all(g.grad_fn is None and not g.requires_grad for g in regularizer_grad(model, x).values())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name,n", [("mlp_multi_output", 6), ("mlp_multi_output", 30), ("matrix_sensing", 12),
                                    ("cnn_groupnorm", 20)])
def test_every_probe_function_works_under_the_callers_grad_mode(mode, name, n):
    # validation code often runs under no_grad or inference_mode; the probe enables what it
    # needs inside, returns the same numbers, and leaves the caller's mode as it was
    from helpers import random_vector
    from noisy_label_sgd import per_sample_sq_grad_norms, regularizer_grad, tangent_projection

    model, x = make(name)
    x = torch.cat([x] * (n // x.shape[0] + 1))[:n]
    y = torch.randn(n, *model.eval()(x[:1]).shape[1:], generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    v = random_vector(model)
    expected = RegularizerProbe(model, x, y)()
    expected_norms = per_sample_sq_grad_norms(model, x)
    expected_grad = regularizer_grad(model, x)
    expected_projection = tangent_projection(model, x, v)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        if mode == "inference_mode":  # the probe set made under inference mode, too
            x, y = x.clone(), y.clone()
            assert x.is_inference()
        report = RegularizerProbe(model, x, y)()
        norms = per_sample_sq_grad_norms(model, x)
        grad = regularizer_grad(model, x)
        projection = tangent_projection(model, x, v)
        assert not torch.is_grad_enabled() and (mode == "no_grad" or torch.is_inference_mode_enabled())
    for field in ("reg", "reg_grad_norm", "manifold_grad_norm", "loss"):
        assert getattr(report, field) == getattr(expected, field), field
    assert torch.equal(report.per_sample, expected.per_sample) and torch.equal(norms, expected_norms)
    for name_, t in grad.items():
        assert torch.equal(t, expected_grad[name_])
        assert torch.equal(projection[name_], expected_projection[name_])


def test_a_model_built_under_inference_mode_is_refused_with_the_reason():
    with torch.inference_mode():
        model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="inference tensors .* build the model outside inference mode"):
        RegularizerProbe(model, torch.randn(4, 3))


@pytest.mark.parametrize("n,outputs", [(100, 1), (300, 1), (1000, 1), (150, 10)])  # 1500 rows > 1354 parameters
def test_float32_probe_of_an_ill_conditioned_j_matches_float64_with_the_same_cutoff(n, outputs):
    # issue 18's measurement: a float32 probe's manifold gradient was 4.01 where float64 gave 0.48
    # (n = 1000), and 22.85 where the tangent space is {0} (10 outputs, n = 500; here 150): K decomposed in
    # float32. Now the solver works in float64; the cutoff follows J's precision
    from noisy_label_sgd import regularizer_grad, tangent_projection
    from noisy_label_sgd.engines.tangent import default_rcond

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model64 = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, outputs)).double()
    x = torch.randn(n, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = x[:, :1].sin().repeat(1, outputs)
    report = RegularizerProbe(copy.deepcopy(model64).float(), x.float(), y.float())()
    grad = regularizer_grad(model64, x)
    same_cutoff = default_rcond(n * outputs, torch.float32)
    expected = torch.cat([t.reshape(-1) for t in tangent_projection(model64, x, grad, rcond=same_cutoff).values()])
    assert_rel_close(report.reg_grad_norm, float(torch.cat([t.reshape(-1) for t in grad.values()]).norm()),
                     rtol=FLOAT32_RTOL)
    if outputs == 10:  # J of full column rank: no tangent space, a manifold gradient of float32 noise
        assert float(expected.norm()) < 1e-9 * report.reg_grad_norm
        assert report.manifold_grad_norm < 1e-5 * report.reg_grad_norm
    else:
        assert_rel_close(report.manifold_grad_norm, float(expected.norm()), rtol=FLOAT32_PROJECTION_RTOL)



def test_the_probe_call_says_what_it_does():
    assert "tangent and normal parts" in RegularizerProbe.__call__.__doc__


def test_a_compiled_model_is_probed_through_its_original_module(tmp_path):
    # training runs the compiled module; the probe differentiates the original (a compiled
    # backward with donated buffers refuses create_graph), the same parameters
    from helpers import train
    from noisy_label_sgd import LabelNoiseSGD, TensorBoardMonitor, per_sample_sq_grad_norms

    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = LabelNoiseSGD(compiled.parameters(), lr=0.05, noise_std=0.1)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    x, y = data(n=30)
    with TensorBoardMonitor(RegularizerProbe(compiled, x, y), log_dir=tmp_path, every=1) as monitor:
        monitor.attach(opt)
        train(compiled, opt, loss_fn, 2)
    assert monitor.failures == 0 and monitor.last_report is not None
    report, plain = RegularizerProbe(compiled, x, y)(), RegularizerProbe(model, x, y)()
    assert (report.reg, report.manifold_grad_norm, report.method) == (plain.reg, plain.manifold_grad_norm, plain.method)
    assert torch.equal(per_sample_sq_grad_norms(compiled, x), per_sample_sq_grad_norms(model, x))


class PerPositionLogits(nn.Module):
    """Logits [n, C, T] for labels [n, T] (nn.CrossEntropyLoss's convention for extra dims)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 4 * 5, dtype=torch.float64)

    def forward(self, x):
        return self.embed(x).reshape(-1, 4, 5)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_class_labels_get_the_cross_entropy_and_the_accuracy_of_the_logits(method):
    # brute force: nn.CrossEntropyLoss on the model's output, the accuracy by argmax, both over
    # the labels that are not the ignore index; reg is that of every logit either way
    x, _ = data()
    torch.manual_seed(3)
    cases = [(mlp(), torch.randint(0, 3, (len(x),))), (PerPositionLogits(), torch.randint(0, 4, (len(x), 5)))]
    for model, labels in cases:
        labels = labels.flatten().index_fill(0, torch.tensor([1, 5]), -100).reshape(labels.shape)
        report = RegularizerProbe(model, x, labels, method=method)()
        with torch.no_grad():
            logits = model(x)
        counted = labels != -100
        assert report.loss_function == "cross_entropy"
        assert_rel_close(report.loss, float(nn.CrossEntropyLoss()(logits, labels)), FLOAT64_RTOL)
        expected_accuracy = int(((logits.argmax(1) == labels) & counted).sum()) / int(counted.sum())
        assert report.accuracy == pytest.approx(expected_accuracy, abs=1e-15)
        assert report.scalars()["probe_accuracy"] == report.accuracy
        assert_rel_close(report.reg, RegularizerProbe(model, x)().reg, FLOAT64_RTOL)
    regression = RegularizerProbe(mlp(), x, data()[1])()
    assert regression.loss_function == "mse" and regression.accuracy is None
    assert "probe_accuracy" not in regression.scalars()
    with torch.no_grad():
        expected_loss = float(nn.functional.mse_loss(mlp()(x), data()[1]))
    assert_rel_close(regression.loss, expected_loss, FLOAT64_RTOL)
