"""RegularizerProbe: the report against brute force, and no side effects on the model."""

import math

import pytest
import torch
from torch import nn

from helpers import FrozenAndBuffers, brute_jacobian, brute_reg_grad, mlp
from noisy_label_sgd import ProbeReport, RegularizerProbe
from noisy_label_sgd.paper_models import MatrixSensing


def data(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def assert_matches_brute_force(report, model, x, y):
    n = x.shape[0]
    J = brute_jacobian(model, x)
    assert math.isclose(report.reg, float(J.pow(2).sum() / n), rel_tol=1e-10)
    torch.testing.assert_close(report.per_sample, J.pow(2).reshape(n, -1).sum(1), rtol=1e-10, atol=0)
    grad = brute_reg_grad(model, x)
    assert math.isclose(report.reg_grad_norm, float(grad.norm()), rel_tol=1e-9)
    _, s, Vh = torch.linalg.svd(J, full_matrices=False)
    V = Vh[: int((s > s[0] * 1e-6).sum())].T
    manifold = grad - V @ (V.T @ grad)
    assert math.isclose(report.manifold_grad_norm, float(manifold.norm()), rel_tol=1e-7)
    assert math.isclose(report.normal_grad_norm, float((grad - manifold).norm()), rel_tol=1e-7)
    assert math.isclose(report.manifold_grad_norm**2 + report.normal_grad_norm**2, report.reg_grad_norm**2, rel_tol=1e-10)
    with torch.no_grad():
        assert math.isclose(report.loss, float(nn.functional.mse_loss(model.eval()(x), y)), rel_tol=1e-12)
    assert report.seconds > 0 and 0 <= report.manifold_fraction <= 1


@pytest.mark.parametrize("solver", ["dense", "cg", "auto"])
def test_report_matches_brute_force(solver):
    model = mlp()
    x, y = data()
    report = RegularizerProbe(model, x, y, solver=solver)()
    assert isinstance(report, ProbeReport)
    assert_matches_brute_force(report, model, x, y)


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("case", ["matrix_sensing", "mlp"])
def test_one_jacobian_from_grad_reg_serves_norms_and_projection(case, method, monkeypatch):
    # J too large for the small-Jacobian path (over 64 rows), small enough for the dense solver:
    # the J formed by grad reg's forward-over-reverse gives the norms and the projection
    from noisy_label_sgd.engines import engine, vmap

    g = torch.Generator().manual_seed(1)
    if case == "matrix_sensing":
        # 70 measurements of a 12 x 12 symmetric X: grad reg = M U has a tangent part
        model = MatrixSensing(12, init=torch.randn(12, 12, generator=g)).double()
        x, y = torch.randn(70, 12, 12, generator=g, dtype=torch.float64), torch.randn(70, generator=g, dtype=torch.float64)
    elif method == "auto":
        return  # closed-form layers: auto takes the fast path
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
    # brute force over the two inputs
    total = 0.0
    for i in range(5):
        out = model(u[i : i + 1], v[i : i + 1]).reshape(-1)
        for j in range(2):
            total += sum(g.pow(2).sum() for g in torch.autograd.grad(out[j], list(model.parameters()), retain_graph=True))
    assert math.isclose(report.reg, float(total) / 5, rel_tol=1e-10)


BAD_PROBES = [
    (lambda: (mlp(), data()[0], data()[1][:5]), {}, ValueError, "inputs have 7 samples but targets have 5"),
    (lambda: (mlp(), data()[0], data()[1]), {"solver": "lu"}, ValueError, "Invalid solver: 'lu'"),
    (lambda: (mlp(), data()[0][:0], None), {}, ValueError, "probe set is empty"),
    (lambda: (mlp().requires_grad_(False), data()[0], None), {}, ValueError, "no trainable parameters"),
    (lambda: (mlp(), (data()[0], data()[0][:3]), None), {}, ValueError, "disagree in their sample dimension"),
    (lambda: (mlp(), data()[0], [1.0]), {}, TypeError, "targets must be a tensor, got list"),
]


@pytest.mark.parametrize("make,kwargs,error,message", BAD_PROBES)
def test_bad_probe_input(make, kwargs, error, message):
    model, x, y = make()
    with pytest.raises(error, match=message):
        RegularizerProbe(model, x, y, **kwargs)


def test_targets_with_the_wrong_number_of_entries():
    x, y = data()
    with pytest.raises(ValueError, match="targets have 2 entries per sample but the model outputs 3"):
        RegularizerProbe(mlp(), x, y[:, :2])()


def test_fast_probe_on_a_model_with_a_per_module_fallback():
    # method="fast" binds the norms; grad reg then comes from the vmap path, still exact
    from helpers import Attention

    with torch.random.fork_rng():
        torch.manual_seed(15)
        model = Attention(masked=True).double()
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = RegularizerProbe(model, x, method="fast")()
    assert report.method == "fast (per-module fallback: attn)"
    J = brute_jacobian(model, x)
    assert math.isclose(report.reg, float(J.pow(2).sum() / 3), rel_tol=1e-10)
    assert math.isclose(report.reg_grad_norm, float(brute_reg_grad(model, x).norm()), rel_tol=1e-9)
