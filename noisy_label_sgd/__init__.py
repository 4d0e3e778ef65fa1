"""noisy_label_sgd: label-noise SGD for any PyTorch model, and probes of its implicit regularizer.

Blanc, Gupta, Valiant & Valiant, "Implicit regularization for deep neural networks driven by an
Ornstein-Uhlenbeck like process", COLT 2020 (arXiv 1904.09080).
"""

from .hooks import attach_output_noise, noisy_loss
from .noise import LabelNoise
from .optim import LabelNoiseSGD, add_label_noise
from .probe import ProbeReport, RegularizerProbe
from .tensorboard import TensorBoardMonitor
from .regularizer import (
    implicit_regularizer,
    per_sample_sq_grad_norms,
    regularizer_grad,
    tangent_projection,
)

__version__ = "0.1.0"

__all__ = [
    "LabelNoise",
    "LabelNoiseSGD",
    "add_label_noise",
    "noisy_loss",
    "attach_output_noise",
    "per_sample_sq_grad_norms",
    "implicit_regularizer",
    "regularizer_grad",
    "tangent_projection",
    "RegularizerProbe",
    "ProbeReport",
    "TensorBoardMonitor",
]
