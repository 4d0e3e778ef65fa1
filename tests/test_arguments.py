"""Issue 30: one registry of bad inputs (entry point, arguments, error type, message) run through
every public entry point, as torch.optim's tests do."""

import pytest
import torch
from torch import nn

from noisy_label_sgd import (LabelNoise, LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor, add_label_noise,
                             implicit_regularizer, per_sample_sq_grad_norms, regularizer_grad, tangent_projection)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


X = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def zero_vector(m):
    return {name: torch.zeros_like(p) for name, p in m.named_parameters()}


def nan_model():
    m = model()
    with torch.no_grad():
        m[2].weight[0, 1] = float("nan")
    return m


MEASURING = {
    "per_sample_sq_grad_norms": lambda m, x, **kw: per_sample_sq_grad_norms(m, x, **kw),
    "implicit_regularizer": lambda m, x, **kw: implicit_regularizer(m, x, **kw),
    "regularizer_grad": lambda m, x, **kw: regularizer_grad(m, x, **kw),
    "tangent_projection": lambda m, x, **kw: tangent_projection(m, x, zero_vector(m), **kw),
    "RegularizerProbe": lambda m, x, **kw: RegularizerProbe(m, x, **kw)(),
}

# (arguments, error, message): every measuring entry point refuses them alike
BAD_MEASURING = [
    (dict(chunk_size=0), ValueError, r"Invalid chunk_size: 0"),
    (dict(chunk_size=2.0), ValueError, r"Invalid chunk_size: 2\.0"),
    (dict(chunk_size=True), ValueError, r"Invalid chunk_size: True"),
    (dict(memory_budget=0), ValueError, r"Invalid memory_budget: 0"),
    (dict(memory_budget=-5), ValueError, r"Invalid memory_budget: -5"),
    (dict(memory_budget="big"), ValueError, r"Invalid memory_budget: 'big'"),
    (dict(method="jvp"), ValueError, r"Invalid method: 'jvp'"),
    (dict(method=1), ValueError, r"Invalid method: 1"),
]

BAD_PROJECTION = [
    (dict(rcond=-1.0), ValueError, r"Invalid rcond: -1\.0"),
    (dict(rcond=float("nan")), ValueError, r"Invalid rcond: nan"),
    (dict(rcond=2), ValueError, r"Invalid rcond: 2"),
    (dict(rcond=1.0), ValueError, r"Invalid rcond: 1\.0"),
    (dict(tol=0.0), ValueError, r"Invalid tol: 0\.0"),
    (dict(max_iter=-3), ValueError, r"Invalid max_iter: -3"),
    (dict(max_iter=0, solver="lsqr"), ValueError, r"Invalid max_iter: 0"),
    (dict(solver="lu"), ValueError, r"Invalid solver: 'lu'"),
]

BAD_NOISE = [
    (dict(std="0.1"), TypeError, r"Invalid noise std: '0\.1'"),
    (dict(std=True), TypeError, r"Invalid noise std: True"),
    (dict(std=-0.1), ValueError, r"Invalid noise std: -0\.1"),
    (dict(std=0.1, seed=-1), ValueError, r"Invalid seed: -1 \(must be an int in \[0, 2\*\*64\)\)"),
    (dict(std=0.1, seed=2**64), ValueError, r"Invalid seed: 18446744073709551616"),
    (dict(std=0.1, seed=3.5), ValueError, r"Invalid seed: 3\.5"),
    (dict(std=0.1, rank=1.5), ValueError, r"Invalid rank: 1\.5"),
    (dict(std=0.1, rank=-2), ValueError, r"Invalid rank: -2"),
    (dict(std=0.1, distribution="flip", p=0.1, num_classes=3), ValueError, r"std=0\.1 is for additive noise"),
    (dict(distribution="flip", p=True, num_classes=3), ValueError, r"Invalid flip probability p: True"),
    (dict(distribution="flip", p=0.1, num_classes=3.0), ValueError, r"Invalid num_classes: 3\.0"),
    (dict(std=0.1, p=0.1), ValueError, r"p and num_classes are for distribution='flip'"),
    (dict(std=0.1, distribution=None), ValueError, r"Invalid noise distribution: None"),
]


@pytest.mark.parametrize("entry", sorted(MEASURING))
@pytest.mark.parametrize("kwargs,error,message", BAD_MEASURING)
def test_every_measuring_entry_point_refuses_the_same_arguments(entry, kwargs, error, message):
    with pytest.raises(error, match=message):
        MEASURING[entry](model(), X, **kwargs)


@pytest.mark.parametrize("kwargs,error,message", BAD_PROJECTION)
def test_the_projection_refuses_bad_options_whichever_solver(kwargs, error, message):
    for method in ("auto", "fast", "vmap"):
        with pytest.raises(error, match=message):
            tangent_projection(model(), X, zero_vector(model()), method=method, **kwargs)


@pytest.mark.parametrize("entry", sorted(MEASURING))
def test_nan_parameters_or_inputs_get_the_same_error_from_every_entry_point(entry):
    with pytest.raises(ValueError, match=r"parameter '2\.weight' holds NaN or Inf"):
        MEASURING[entry](nan_model(), X)
    with pytest.raises(ValueError, match=r"input 0 holds NaN or Inf"):
        MEASURING[entry](model(), X.index_fill(0, torch.tensor([1]), float("inf")))


@pytest.mark.parametrize("kwargs,error,message", BAD_NOISE)
def test_every_noise_entry_point_refuses_the_same_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        LabelNoise(**kwargs)
    with pytest.raises(error, match=message):
        add_label_noise(torch.optim.SGD(model().parameters(), lr=0.1), **kwargs)
    renamed = {("noise_std" if name == "std" else name): value for name, value in kwargs.items()}
    with pytest.raises(error, match=message):
        LabelNoiseSGD(model().parameters(), lr=0.1, **renamed)


def test_misuses_of_the_stream_are_refused():
    with pytest.raises(TypeError, match=r"Invalid ignore_index: 1\.5"):
        LabelNoise(0.1, ignore_index=1.5)
    noise, first = LabelNoise(0.1), torch.optim.SGD(model().parameters(), lr=0.1)
    add_label_noise(first, noise=noise)
    with pytest.raises(RuntimeError, match="already advances with another optimizer"):
        add_label_noise(torch.optim.Adam(model().parameters()), noise=noise)
    with pytest.raises(ValueError, match=r"either noise= or its arguments.*std="):
        add_label_noise(torch.optim.SGD(model().parameters(), lr=0.1), noise=LabelNoise(0.1), std=0.2)
    with pytest.raises(ValueError, match=r"either noise= or its arguments, not both \(got noise= and seed=\)"):
        LabelNoiseSGD(model().parameters(), lr=0.1, noise=LabelNoise(0.1), seed=3)
    with pytest.raises(ValueError, match=r"meta device"):
        LabelNoise(0.1).perturb(torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match=r"schedule's value at step 0\): None"):
        LabelNoise(lambda step: None).perturb(torch.zeros(3))
    saved = LabelNoise(0.1).state_dict()
    for key, value in (("step", 2.7), ("call", -1)):
        with pytest.raises(ValueError, match=rf"Invalid LabelNoise state_dict {key}"):
            LabelNoise(0.1).load_state_dict({**saved, key: value})
    old = {k: v for k, v in saved.items() if k != "stream"}
    with pytest.warns(UserWarning, match="stream version 1"):
        LabelNoise(0.1).load_state_dict(old)


def test_a_module_passed_as_a_probe_and_bad_monitor_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="got the module Sequential; wrap it"):
        TensorBoardMonitor(model(), log_dir=tmp_path)
    probe = RegularizerProbe(model(), X)
    for kwargs, message in ((dict(every=0), r"Invalid every: 0"), (dict(every=2.0), r"Invalid every: 2\.0"),
                            (dict(batch_size=0), r"Invalid batch_size: 0"),
                            (dict(total_steps=-1), r"Invalid total_steps: -1")):
        with pytest.raises(ValueError, match=message):
            TensorBoardMonitor(probe, log_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="targets need a leading sample dimension"):
        RegularizerProbe(model(), X, torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"vector\['0\.weight'\] must be a tensor"):
        tangent_projection(model(), X, {name: 0.0 for name, _ in model().named_parameters()})
