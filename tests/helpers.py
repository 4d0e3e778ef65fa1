"""Shared fixtures: small models and data made from explicit generators, the named tolerances,
and the one brute-force reference (per-sample autograd loops, SVD null space, finite differences)
every test file compares against."""

import torch
from torch import nn

from noisy_label_sgd.paper_models import MatrixSensing, TwoLayerReLU1D, TwoLayerSigmoid

# -- tolerances: one per kind of comparison --------------------------------------------------

# float64, an exact path against the brute-force loop or SVD (every path agrees to about 1e-15;
# the margin covers sums in another order over a few thousand terms)
FLOAT64_RTOL = 1e-10
# float64 LSQR (stopped at ||J r|| <= 1e-14 ||J|| ||r||) against an exact reference; the
# result's error is about that times cond(J), and the products' own rounding
LSQR_RTOL = 1e-9
# central finite differences in float64 with step FD_STEP: truncation ~ h^2, rounding ~ eps / h
FD_STEP = 1e-5
FD_ATOL = 1e-8
# float32 against float64 of the same model: norms and grad reg carry a few units of float32
# rounding (eps32 = 1.2e-7) per layer; the projection also the condition number of K, which the
# float32 tests keep below 1e4 (eps32 * 1e4 = 1.2e-3)
FLOAT32_RTOL = 1e-5
FLOAT32_PROJECTION_RTOL = 1e-3


def mlp(seed: int = 0, sizes=(6, 16, 16, 3), dtype=torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=dtype) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def batch(step: int, n: int = 16, d_in: int = 6, d_out: int = 3, dtype=torch.float64):
    """The data of one training step, a pure function of the step (so resumed runs match)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


def train(model, opt, loss_fn, steps, scheduler=None, start=0):
    """``steps`` optimizer steps on the data of :func:`batch`, from step ``start``."""
    for step in range(start, start + steps):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


# -- models for the regularizer tests (float64) ----------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4 * 2 * 2, 2)

    def forward(self, x):
        x = torch.tanh(self.norm(self.conv1(x)))
        return self.head(torch.tanh(self.conv2(x)).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(x).mean(1)).squeeze(-1)


class FrozenAndBuffers(nn.Module):
    """A frozen layer, BatchNorm buffers (eval mode) and an affine LayerNorm."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 6)
        self.frozen.requires_grad_(False)
        self.bn = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.out(torch.tanh(self.ln(self.bn(self.frozen(x)))))


class ReusedWeight(nn.Module):
    """One Linear applied twice: its weight enters the output through two paths."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x))))).squeeze(-1)


class InplaceResidual(nn.Module):
    """In-place ReLU right after a Linear, and a residual += : what breaks hook-based peers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.fc1(x))  # in place on fc1's output
        r = self.fc2(h)
        r += h  # in place on fc2's output (a ResNet-style residual)
        return self.head(torch.tanh(r))


class ConvSequence(nn.Module):
    """Conv1d (per-module fallback) feeding a Linear over sequence positions (Gram closed form)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # [n, positions, channels]
        return self.head(torch.tanh(self.proj(h)).mean(1)).squeeze(-1)


class Attention(nn.Module):
    """nn.MultiheadAttention as self-attention (closed form: two projections), sequence-first and
    unmasked, or batch-first with a causal mask and a padding mask read off the input (keys whose
    first feature exceeds 0.5 are padding; the first key never is)."""

    def __init__(self, masked: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=masked)
        self.head = nn.Linear(6, 1)
        self.masked = masked

    def forward(self, x):  # x: [n, L, 6]
        if self.masked:
            causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
            out, _ = self.attn(x, x, x, need_weights=False, attn_mask=causal, key_padding_mask=padding_of(x))
            return self.head(torch.tanh(out).mean(1)).squeeze(-1)
        seq = x.transpose(0, 1)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return self.head(torch.tanh(out).mean(0)).squeeze(-1)


def padding_of(x: torch.Tensor) -> torch.Tensor:
    """A boolean padding mask [n, L] read off the input (True: a padded position)."""
    return (x[..., 0] > 0.5) & (torch.arange(x.shape[1]) > 0)


class AttentionWeights(nn.Module):
    """Self-attention returning its per-head weights, which the output uses too, with an
    additive (float) padding mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2)
        self.head = nn.Linear(6, 1)

    def forward(self, x):  # x: [n, L, 6]
        seq = x.transpose(0, 1)
        additive = torch.zeros(padding_of(x).shape, dtype=x.dtype).masked_fill(padding_of(x), -1e4)
        out, weights = self.attn(seq, seq, seq, key_padding_mask=additive, average_attn_weights=False)
        return self.head(torch.tanh(out[0])).squeeze(-1) + weights[:, :, 0].pow(2).sum((1, 2))


class CrossAttention(nn.Module):
    """Attention whose keys differ from its queries (per-module fallback), masks as keywords."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.keys = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.attn(x, self.keys(x), x, key_padding_mask=padding_of(x), need_weights=False)
        return self.head(torch.tanh(out).mean(1)).squeeze(-1)


class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder (two layers) with a padding mask and a causal mask."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        out = self.encoder(x, mask=causal, src_key_padding_mask=padding_of(x), is_causal=True)
        return self.head(out[:, 0])


class BagOfTokens(nn.Module):
    """Token ids read off the input (so the battery's float inputs serve), an Embedding with a
    padding index (its row gets no gradient) and a tokens' mean into a Linear head."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(4, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x: [n, T] floats -> ids in 0..3, repeats within a sample
        ids = (x.abs() * 2).long().clamp(max=3)
        return self.head(torch.tanh(self.embedding(ids)).mean(1))


class TiedLanguageModel(nn.Module):
    """A token embedding tied to the output head (one weight [V, d], as GPT-2 and Llama), token
    ids read off the float input, a padding index, two scalar outputs from the last positions."""

    def __init__(self, vocabulary=7, width=4):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, x):  # x: [n, T] floats -> ids in 0..6
        ids = (x.abs() * 3).long().clamp(max=6)
        return self.head(torch.tanh(self.mix(self.embedding(ids))))[:, -2:].logsumexp(-1)


class TiedLinears(nn.Module):
    """One weight in two Linear layers (an autoencoder's tied square maps), and, with
    ``custom``, also in a module without a closed form (its cross terms from per-sample
    gradients)."""

    def __init__(self, custom=False):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.second.weight = self.first.weight
        self.custom = ScaledLinear(self.first.weight) if custom else None

    def forward(self, x):
        h = torch.tanh(self.second(torch.tanh(self.first(x))))
        if self.custom is not None:
            h = torch.tanh(self.custom(h))
        return self.head(h)


class ScaledLinear(nn.Module):
    """x W^T times a learned scale: no closed form."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.scale = weight, nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.scale * (x @ self.weight.T)


class SequenceFirstEncoder(nn.Module):
    """nn.TransformerEncoderLayer in its default layout, sequence first: its Linear and
    LayerNorm layers see [T, n, d], samples along dim 1."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0)
        self.head = nn.Linear(6, 1)

    def forward(self, x):  # x: [n, T, 6]
        return self.head(self.layer(x.transpose(0, 1)).mean(0)).squeeze(-1)


class SharedInput(nn.Module):
    """A Linear on an input shared by all samples ([1, d], broadcast), and an Embedding of
    positions shared alike (as Hugging Face models look up position embeddings): their output
    gradients sum over the samples unless the trace expands them. ``summed``: the shared
    output is reduced over its dim 0 first, which an expansion would change."""

    def __init__(self, summed: bool = False):
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.positions = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 1)
        self.summed = summed

    def forward(self, x):  # x: [n, 5, 4]
        shared = self.shared(torch.ones(1, 1, 3, dtype=x.dtype))
        shared = shared.sum(0) if self.summed else shared
        h = x + shared + self.positions(torch.arange(5).unsqueeze(0))
        return self.head(torch.tanh(h).mean(1))


class UnusedPooler(nn.Module):
    """A pooler (LayerNorm and Linear) computed beside the hidden state the output uses, as
    Hugging Face's vision models with a pooler compute one: its parameters' gradients are all
    zero."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(5, 7), nn.Linear(7, 2)
        self.pooler = nn.Sequential(nn.LayerNorm(7), nn.Linear(7, 3))

    def forward(self, x):
        hidden = torch.tanh(self.inner(x))
        self.pooler(hidden)
        return self.head(hidden)


class SharedInputProjections(nn.Module):
    """Linear maps on one input tensor, with and without bias (Llama's q, k, v), on sequence
    positions and on vectors: the closed forms share what they compute from that input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 3), nn.Linear(4, 3, bias=False), nn.Linear(4, 3)
        self.pooled_a, self.pooled_b = nn.Linear(4, 2, bias=False), nn.Linear(4, 2)

    def forward(self, x):  # x: [n, T, 4]
        scores = (self.q(x) * self.k(x)).sum(-1).softmax(-1)  # [n, T]
        attended = (scores.unsqueeze(-1) * torch.tanh(self.v(x))).sum(1)
        pooled = x.mean(1)
        return attended.sum(-1) + (self.pooled_a(pooled) * torch.tanh(self.pooled_b(pooled))).sum(-1)


class BatchNormNet(nn.Module):
    """BatchNorm2d and BatchNorm1d in eval mode, with running statistics away from 0 and 1."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm2d = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.head, self.norm1d, self.out = nn.Linear(16, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)
        for norm in (self.norm2d, self.norm1d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, x):
        h = torch.tanh(self.norm2d(self.conv(x))).mean((2, 3), keepdim=True).expand(-1, -1, 2, 2).flatten(1)
        return self.out(torch.tanh(self.norm1d(self.head(h))))


class Recurrent(nn.Module):
    """A recurrent layer (nn.RNN, nn.LSTM or nn.GRU) and a Linear head on its last time step,
    or on its final hidden state (``head_on_state``), from an initial state read off the input
    (``initial_state``)."""

    def __init__(self, cls, head_on_state: bool = False, initial_state: bool = False, **kwargs):
        super().__init__()
        self.rnn = cls(3, 4, **kwargs)
        directions = 2 if kwargs.get("bidirectional") else 1
        self.out_size = kwargs.get("proj_size") or 4
        self.head = nn.Linear(self.out_size * (1 if head_on_state else directions), 2 if head_on_state else 1)
        self.head_on_state, self.initial_state = head_on_state, initial_state

    def forward(self, x):  # x: [n, T, 3]
        rnn = self.rnn
        seq = x if rnn.batch_first else x.transpose(0, 1)
        hx = None
        if self.initial_state:
            shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), x.shape[0])
            h0 = x[:, 0, 0].reshape(1, -1, 1).expand(*shape, self.out_size).contiguous()
            hx = (h0, torch.cat([h0, h0], -1)[..., :rnn.hidden_size]) if isinstance(rnn, nn.LSTM) else h0
        out, state = rnn(seq, hx)
        if self.head_on_state:
            h = state[0] if isinstance(rnn, nn.LSTM) else state
            return self.head(h[-1])
        last = out[:, -1] if rnn.batch_first else out[-1]
        return self.head(last).squeeze(-1)


def brute_jacobian(model: nn.Module, inputs) -> torch.Tensor:
    """J [n k, p] by a per-sample, per-output loop of torch.autograd.grad (the reference);
    ``inputs``: a tensor, or a tuple of the model's arguments."""
    training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    rows = []
    for i in range(args[0].shape[0]):
        out = model(*(t[i : i + 1] for t in args)).reshape(-1)
        for j in range(out.numel()):
            grads = torch.autograd.grad(out[j], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    model.train(training)
    return torch.stack(rows).detach()


def brute_reg(model: nn.Module, inputs, create_graph: bool = False) -> torch.Tensor:
    """reg by the same loop (``inputs`` as for :func:`brute_jacobian`); with create_graph it can
    be differentiated by plain autograd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # fused CPU attention kernels have no double backward
        return _brute_reg(model, inputs, create_graph)


def _brute_reg(model, inputs, create_graph):
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    n = args[0].shape[0]
    for i in range(n):
        out = model(*(t[i : i + 1] for t in args)).reshape(-1)
        for j in range(out.numel()):
            grads = torch.autograd.grad(out[j], params, create_graph=create_graph, retain_graph=True, allow_unused=True)
            total = total + sum((g**2).sum() for g in grads if g is not None)
    return total / n


def brute_reg_grad(model: nn.Module, inputs) -> torch.Tensor:
    """grad reg, flat over trainable parameters, by plain autograd through the loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    reg = brute_reg(model, inputs, create_graph=True)
    if not reg.requires_grad:  # J does not depend on the parameters (a linear model)
        return torch.zeros(sum(p.numel() for p in params), dtype=reg.dtype)
    grads = torch.autograd.grad(reg, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def brute_sq_norms(model: nn.Module, inputs) -> torch.Tensor:
    """Per-sample ||J_i||_F^2 from the loop's J."""
    n = (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
    return brute_jacobian(model, inputs).pow(2).reshape(n, -1).sum(1)


def trainable_flat(model: nn.Module, tensors: dict) -> torch.Tensor:
    """A dict over the trainable parameters, flattened in named_parameters() order."""
    return torch.cat([tensors[n].reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


def svd_tangent_projection(J: torch.Tensor, v: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """v minus its component in the row space of J, from an SVD.

    ``rank``: how many singular vectors span the row space. By default it is read off a gap that
    any sensible cutoff agrees on: every singular value either above 1e-6 s_max or below 1e-12
    s_max (an ambiguous spectrum fails the test instead of guessing).
    """
    _, s, Vh = torch.linalg.svd(J, full_matrices=False)
    if rank is None:
        relative = s / s[0]
        ambiguous = (relative < 1e-6) & (relative > 1e-12)
        assert not bool(ambiguous.any()), f"no clear rank: singular values {s.tolist()}"
        rank = int((relative >= 1e-6).sum())
    V = Vh[:rank].T
    return v - V @ (V.T @ v)


def finite_difference_grad(fn, model: nn.Module, name: str, index: int, h: float = FD_STEP) -> float:
    """d fn() / d (parameter ``name``, flat ``index``) by a central difference."""
    p = dict(model.named_parameters())[name]
    with torch.no_grad():
        flat = p.view(-1)
        old = flat[index].item()
        flat[index] = old + h
        up = float(fn())
        flat[index] = old - h
        down = float(fn())
        flat[index] = old
    return (up - down) / (2 * h)


def assert_rel_close(actual, expected, rtol=FLOAT64_RTOL, atol=0.0):
    """max |actual - expected| <= rtol max |expected| + atol (tensors or numbers)."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float((actual - expected).abs().max())
    bound = rtol * float(expected.abs().max()) + atol
    assert error <= bound, f"max abs error {error:.3e} > {bound:.3e}"


def seeded(seed, build):
    """Build a module whose default initialisation draws from a forked, seeded global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().double()


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_vector(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters() if p.requires_grad}


def partially_frozen(build, frozen):
    """``build()`` with the parameters whose names end in one of ``frozen`` frozen."""
    def make():
        model = build()
        for name, p in model.named_parameters():
            if name.endswith(frozen):
                p.requires_grad_(False)
        return model
    return make


# -- the model battery: every numerical test runs over it ------------------------------------

CASES = {
    "mlp_multi_output": (lambda: mlp(sizes=(5, 8, 8, 3)), lambda: randn(6, 5)),
    # J independent of the parameters: reg is constant, grad reg 0
    "linear_model": (lambda: seeded(32, lambda: nn.Linear(5, 2)), lambda: randn(6, 5)),
    "cnn_groupnorm": (lambda: seeded(1, SmallCNN), lambda: randn(4, 2, 5, 5)),
    "transformer_encoder_layer": (lambda: seeded(2, TinyTransformer), lambda: randn(3, 4, 8)),
    "frozen_params_and_buffers": (lambda: seeded(3, FrozenAndBuffers), lambda: randn(6, 5)),
    "reused_weight": (lambda: seeded(4, ReusedWeight), lambda: randn(5, 4)),
    "layernorm_mlp": (lambda: seeded(9, lambda: nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(),
                                                               nn.Linear(7, 2))), lambda: randn(6, 5)),
    "inplace_relu_residual": (lambda: seeded(10, InplaceResidual), lambda: randn(5, 6)),
    "conv1d_sequence_linear": (lambda: seeded(11, ConvSequence), lambda: randn(4, 3, 7)),
    "attention_sequence_first": (lambda: seeded(14, Attention), lambda: randn(3, 5, 6)),
    "attention_causal_and_padding_masks": (lambda: seeded(15, lambda: Attention(masked=True)), lambda: randn(3, 5, 6)),
    "attention_weights_returned": (lambda: seeded(25, AttentionWeights), lambda: randn(3, 5, 6, seed=1)),
    "cross_attention_fallback": (lambda: seeded(26, CrossAttention), lambda: randn(3, 5, 6, seed=2)),
    "encoder_causal_and_padding_masks": (lambda: seeded(27, MaskedEncoder), lambda: randn(3, 4, 6, seed=3)),
    # as many positions as samples: the sample dim is found from shapes for one and two samples
    "encoder_layer_sequence_first": (lambda: seeded(33, SequenceFirstEncoder), lambda: randn(4, 4, 6, seed=4)),
    "shared_input_and_positions": (lambda: seeded(34, SharedInput), lambda: randn(4, 5, 4, seed=5)),
    "embedding_with_padding_index": (lambda: seeded(35, BagOfTokens), lambda: randn(5, 6, seed=6)),
    "projections_of_one_input": (lambda: seeded(41, SharedInputProjections), lambda: randn(5, 3, 4, seed=12)),
    "unused_pooler": (lambda: seeded(43, UnusedPooler), lambda: randn(6, 5, seed=13)),
    "lstm_two_layers_batch_first": (lambda: seeded(28, lambda: Recurrent(nn.LSTM, num_layers=2, batch_first=True)),
                                    lambda: randn(4, 3, 3)),
    "gru_bidirectional_state_head": (
        lambda: seeded(29, lambda: Recurrent(nn.GRU, head_on_state=True, bidirectional=True)), lambda: randn(3, 3, 3)),
    "rnn_relu_initial_state_no_bias": (lambda: seeded(30, lambda: Recurrent(
        nn.RNN, initial_state=True, nonlinearity="relu", bias=False, num_layers=2)), lambda: randn(4, 3, 3)),
    "lstm_projection_bidirectional_initial_state": (lambda: seeded(31, lambda: Recurrent(
        nn.LSTM, initial_state=True, proj_size=2, bidirectional=True, batch_first=True)), lambda: randn(3, 3, 3)),
    # reflect padding: no closed form, a per-module fallback
    "reflect_padded_conv_fallback": (lambda: seeded(13, lambda: nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))),
        lambda: randn(3, 4, 4, 4)),
    # groups 2, then depthwise (groups = channels): the samples' groups around the layer's own
    "grouped_and_depthwise_conv": (lambda: seeded(36, lambda: nn.Sequential(
        nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1, groups=6, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 2))), lambda: randn(3, 4, 5, 5, seed=7)),
    "batchnorm_eval": (lambda: seeded(37, BatchNormNet), lambda: randn(5, 3, 4, 4, seed=8)),
    # tied parameters: each use's own part plus the cross terms between them
    "tied_embedding_and_head": (lambda: seeded(38, TiedLanguageModel), lambda: randn(5, 4, seed=9)),
    "tied_linears": (lambda: seeded(39, TiedLinears), lambda: randn(5, 4, seed=10)),
    "tied_linear_and_custom_module": (lambda: seeded(40, lambda: TiedLinears(custom=True)), lambda: randn(5, 4, seed=11)),
    # 16 input channels: the per-sample weight gradients as one grouped convolution's
    "wide_conv2d_strided_dilated": (lambda: seeded(16, lambda: nn.Sequential(
        nn.Conv2d(16, 2, 3, stride=2, padding=2, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 2))),
        lambda: randn(3, 16, 10, 10)),
    "wide_conv1d": (lambda: seeded(17, lambda: nn.Sequential(
        nn.Conv1d(16, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 12, 1))), lambda: randn(4, 16, 12)),
    # few input channels: per-sample weight gradients from the input patches (strided view)
    "narrow_conv2d_strided_dilated": (lambda: seeded(18, lambda: nn.Sequential(
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), nn.Tanh(),
        nn.Conv2d(4, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 5, 2))), lambda: randn(4, 3, 9, 8)),
    # unpadded, on a channels-last input: the patches read the input where it lies
    "narrow_conv2d_channels_last": (lambda: seeded(20, lambda: nn.Sequential(
        nn.Conv2d(3, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 4, 1))),
        lambda: randn(4, 3, 7, 9).to(memory_format=torch.channels_last)),
    # few output positions for many weights: the Gram matrices over positions cost least
    "conv2d_few_positions": (lambda: seeded(42, lambda: nn.Sequential(
        nn.Conv2d(8, 16, 3), nn.Tanh(), nn.Conv2d(16, 6, 2, padding=1), nn.Flatten(), nn.Linear(6 * 16, 2))),
        lambda: randn(5, 8, 5, 5, seed=13)),
    "narrow_conv1d_dilated": (lambda: seeded(19, lambda: nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 1))),
        lambda: randn(5, 2, 11)),
    "matrix_sensing": (lambda: MatrixSensing(4, init=randn(4, 4, seed=5)).double(), lambda: randn(7, 4, 4)),
    "relu_1d": (lambda: TwoLayerReLU1D(6, torch.Generator().manual_seed(6)).double(), lambda: randn(8)),
    "sigmoid_single_point_tanh": (
        lambda: TwoLayerSigmoid(5, 3, "tanh", torch.Generator().manual_seed(7)).double(), lambda: randn(1, 3)),
    "sigmoid_single_point_logistic": (
        lambda: TwoLayerSigmoid(5, 3, "logistic", torch.Generator().manual_seed(8)).double(), lambda: randn(1, 3)),
    # frozen parts: a frozen parameter must count nowhere, a trainable one beside it everywhere
    "mlp_frozen_biases": (partially_frozen(lambda: mlp(seed=21, sizes=(5, 8, 8, 3)), ("bias",)), lambda: randn(6, 5)),
    "mlp_frozen_weights_trainable_biases": (
        partially_frozen(lambda: mlp(seed=22, sizes=(5, 8, 8, 2)), ("weight",)), lambda: randn(6, 5)),
    "cnn_partially_frozen": (partially_frozen(lambda: seeded(23, SmallCNN), ("conv1.bias", "norm.weight", "head.weight")),
                             lambda: randn(4, 2, 5, 5)),
    "transformer_frozen_out_proj_bias_and_norm": (
        partially_frozen(lambda: seeded(24, TinyTransformer), ("out_proj.bias", "norm1.weight", "linear2.bias")),
        lambda: randn(3, 4, 8)),
}
IDS = list(CASES)


def make(name):
    build, inputs = CASES[name]
    return build(), inputs()


# method="fast" on a model where some module falls back: the norms are the fast engine's, grad
# reg (torch.func's) is refused, by every entry point alike
FAST_REFUSES_GRAD = "method='fast' cannot differentiate the norms of this model: .* per-module fallback"
# the cases of make() where that happens
NO_FAST_GRAD = {"reused_weight", "cross_attention_fallback", "reflect_padded_conv_fallback", "matrix_sensing", "relu_1d",
                "sigmoid_single_point_tanh", "sigmoid_single_point_logistic", "tied_linear_and_custom_module"}


def norms_method(model: nn.Module, inputs, method: str = "fast", **options) -> str:
    """The report's ``method`` of the engine that measures the norms alone."""
    from noisy_label_sgd.engines import select_engine

    engine = select_engine(model, inputs, method, **options)
    with engine.measuring():
        engine.sq_norms()
    return engine.method
