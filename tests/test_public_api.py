"""The public names are a contract (DESIGN.md): exactly these, all importable, typed package."""

import os

import noisy_label_sgd

PUBLIC = {
    "LabelNoise", "LabelNoiseSGD", "add_label_noise", "noisy_loss", "attach_output_noise",
    "per_sample_sq_grad_norms", "implicit_regularizer", "regularizer_grad", "tangent_projection",
    "RegularizerProbe", "ProbeReport", "TensorBoardMonitor",
}


def test_exact_public_names():
    assert set(noisy_label_sgd.__all__) == PUBLIC and len(noisy_label_sgd.__all__) == len(PUBLIC)
    for name in PUBLIC:
        assert getattr(noisy_label_sgd, name) is not None


def test_package_ships_py_typed():
    assert os.path.exists(os.path.join(os.path.dirname(noisy_label_sgd.__file__), "py.typed"))
