r"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` written out over time steps, for every engine.

PyTorch runs a recurrent layer as one fused operation (``aten::lstm`` and the like) that has no
batching rule, so torch.func cannot take per-sample Jacobians through it. Inside
:func:`~noisy_label_sgd.engines.functional.evaluation_mode` each such module instead runs
:func:`unrolled_forward`: the same equations (PyTorch's documented cell equations, any number of
layers, either layout, bidirectional, LSTM projections, a given initial state), one time step at a
time in elementary operations, which vmap, jvp and double backward all handle.

For the fast engine the written-out forward also reports every affine map it applies: the input
projection of a layer and direction (``weight_ih``, ``bias_ih``) is applied once to the whole
sequence, the recurrent projection (``weight_hh``, ``bias_hh``, and an LSTM's ``weight_hr``) once
per time step; each is an affine map over positions, whose per-sample squared norm has the
closed form of a Linear on a sequence (:func:`~noisy_label_sgd.engines.closed_forms.affine_map_sq_norms`
with the time steps as positions).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

# (label of one affine map, the names of its parameters, its input with samples first, its
# output) -> None
Recorder = Callable[[str, tuple[str, ...], torch.Tensor, torch.Tensor], None]

STOCK_FORWARDS = {nn.RNN: nn.RNN.forward, nn.LSTM: nn.LSTM.forward, nn.GRU: nn.GRU.forward}


def is_stock_recurrent(module: nn.Module) -> bool:
    """An nn.RNN, nn.LSTM or nn.GRU running PyTorch's own forward (not a subclass's)."""
    return any(isinstance(module, cls) and type(module).forward is forward for cls, forward in STOCK_FORWARDS.items())


def unrolled_forward(module: nn.RNNBase, record: Recorder | None = None):
    """The module's forward (same arguments, same outputs) written out one step at a time;
    ``record`` hears of every affine map applied. A PackedSequence goes to the stock forward."""
    stock = type(module).forward.__get__(module)
    lstm, gru = isinstance(module, nn.LSTM), isinstance(module, nn.GRU)
    directions = 2 if module.bidirectional else 1

    def affine(kind: str, layer: int, direction: int, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b with the layer's ``kind`` of weight ("ih", "hh" or "hr") and its bias if
        it has one; x with samples first."""
        label = f"{kind}_l{layer}" + ("_reverse" if direction else "")
        names = (f"weight_{label}",) + ((f"bias_{label}",) if module.bias and kind != "hr" else ())
        weight, *bias = (getattr(module, name) for name in names)
        out = nn.functional.linear(x, weight, bias[0] if bias else None)
        if record is not None:
            record(label, names, x, out)
        return out

    def cell(gates_in: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, layer: int, direction: int):
        gates_h = affine("hh", layer, direction, h)
        if gru:
            r_in, z_in, n_in = gates_in.chunk(3, -1)
            r_h, z_h, n_h = gates_h.chunk(3, -1)
            r, z = torch.sigmoid(r_in + r_h), torch.sigmoid(z_in + z_h)
            candidate = torch.tanh(n_in + r * n_h)
            return (1 - z) * candidate + z * h, None
        gates = gates_in + gates_h
        if not lstm:
            return (torch.tanh(gates) if module.nonlinearity == "tanh" else torch.relu(gates)), None
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if module.proj_size > 0:
            h = affine("hr", layer, direction, h)
        return h, c

    def forward(input, hx=None):
        if isinstance(input, PackedSequence):
            return stock(input, hx)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)  # time-major [T, N, features] from here on
        if batched and module.batch_first:
            x = x.transpose(0, 1)
        steps, n = x.shape[:2]
        h_size = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
        if hx is None:
            h0 = x.new_zeros(module.num_layers * directions, n, h_size)
            c0 = x.new_zeros(module.num_layers * directions, n, module.hidden_size) if lstm else None
        else:
            h0, c0 = hx if lstm else (hx, None)
            if not batched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if lstm else None)
        last_h, last_c = [], []
        for layer in range(module.num_layers):
            outputs = []
            for direction in range(directions):
                seq = x.flip(0) if direction else x
                # one map over all time steps, samples first: [N, T, features]
                gates_in = affine("ih", layer, direction, seq.transpose(0, 1)).transpose(0, 1)
                index = layer * directions + direction
                h, c = h0[index], (c0[index] if lstm else None)
                hs = []
                for t in range(steps):
                    h, c = cell(gates_in[t], h, c, layer, direction)
                    hs.append(h)
                out = torch.stack(hs)
                outputs.append(out.flip(0) if direction else out)
                last_h.append(h)
                last_c.append(c)
            x = torch.cat(outputs, -1) if directions > 1 else outputs[0]
            if layer < module.num_layers - 1 and module.dropout > 0 and module.training:
                x = nn.functional.dropout(x, module.dropout, training=True)
        h_n = torch.stack(last_h)
        state = (h_n, torch.stack(last_c)) if lstm else h_n
        if not batched:
            return x.squeeze(1), ((h_n.squeeze(1), state[1].squeeze(1)) if lstm else h_n.squeeze(1))
        return (x.transpose(0, 1) if module.batch_first else x), state

    forward.unrolled = True  # (recognised by the fast engine's trace)
    return forward


@contextmanager
def unrolled_recurrences(model: nn.Module) -> Iterator[None]:
    """Every stock recurrent module of ``model`` runs :func:`unrolled_forward` (an instance
    forward a user set is left alone)."""
    modules = [m for m in model.modules() if is_stock_recurrent(m) and "forward" not in vars(m)]
    for m in modules:
        m.forward = unrolled_forward(m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward
