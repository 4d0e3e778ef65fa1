"""The models of the paper's three settings (Blanc et al. 2020, Sections 4-5 and Appendix C).

Used by the examples and the tests; each takes its inputs as a batch and returns one scalar
prediction per sample, shape [n].
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MatrixSensing", "TwoLayerReLU1D", "TwoLayerSigmoid"]


class MatrixSensing(nn.Module):
    r"""Matrix sensing with a symmetric factorisation: :math:`h_i(U) = \langle A_i, U U^\top\rangle`.

    ``forward(A)`` takes measurement matrices A of shape [n, d, d]. The truth is
    :math:`X^* = U^* U^{*\top}` of low rank; :math:`\partial h_i/\partial U = (A_i + A_i^\top) U`,
    so :math:`\mathrm{reg}(U) = \frac1n\sum_i \|(A_i + A_i^\top)U\|_F^2`.
    """

    def __init__(self, d: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.eye(d) if init is None else init.clone())

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nij,ij->n", A, self.U @ self.U.T)


class TwoLayerReLU1D(nn.Module):
    r""":math:`f(x) = \sum_i c_i\,\mathrm{ReLU}(a_i x + b_i) + a x + b`, every weight trainable.

    ``forward(x)`` takes x of shape [n] or [n, 1].
    """

    def __init__(self, width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        g = generator
        self.a_hidden = nn.Parameter(torch.randn(width, generator=g))
        self.b_hidden = nn.Parameter(torch.randn(width, generator=g))
        self.c = nn.Parameter(torch.randn(width, generator=g) / width**0.5)
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1)
        hidden = torch.relu(x * self.a_hidden + self.b_hidden)
        return hidden @ self.c + self.a * x[:, 0] + self.b


class TwoLayerSigmoid(nn.Module):
    r""":math:`f(x) = \sum_i c_i\, s(w_i^\top x)` with no biases; s is tanh or the logistic sigmoid.

    On one data point x the paper (Appendix C) has
    :math:`\mathrm{reg} = \sum_i s(w_i^\top x)^2 + c_i^2 s'(w_i^\top x)^2 \|x\|^2`.
    """

    def __init__(
        self, width: int, dim: int, activation: str = "tanh", generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if activation not in ("tanh", "logistic"):
            raise ValueError(f"Invalid activation: {activation!r} (choose 'tanh' or 'logistic')")
        self.activation = activation
        self.w = nn.Parameter(torch.randn(width, dim, generator=generator) / dim**0.5)
        self.c = nn.Parameter(torch.randn(width, generator=generator) / width**0.5)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.w.T
        return torch.tanh(z) if self.activation == "tanh" else torch.sigmoid(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x) @ self.c
