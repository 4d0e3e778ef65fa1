"""Issue 30: the measurement leaves the model as it found it, and the noise stream uses all 64 bits."""

import copy

import pytest
import torch
from torch import nn

from noisy_label_sgd import (LabelNoise, RegularizerProbe, per_sample_sq_grad_norms, regularizer_grad,
                             tangent_projection)
from noisy_label_sgd.engines.torch_internals import functorch_transforms_active
from noisy_label_sgd.noise import stream_key, uniform_bits

from helpers import IDS, make


class Counting(nn.Module):
    """A head whose forward counts its calls in place (not under torch.func, which refuses the
    write) and keeps a running value by assigning a new tensor."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(1, dtype=torch.float64))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        if not functorch_transforms_active():
            self.calls += 1
        self.seen = self.seen + x.detach().mean()
        return self.head(x)


def renorming_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Tanh(), Counting()).double()
    with torch.no_grad():
        model[0].weight.mul_(5)  # every row above max_norm
    return model, torch.randint(0, 10, (6, 2), generator=torch.Generator().manual_seed(1))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def brute_force(model, x):
    """Per-sample loop on a copy whose table was renormalised as torch's forward does it."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x)  # the in-place renormalisation of the rows x looks up
    params = list(twin.parameters())
    norms, reg = [], 0.0
    for i in range(len(x)):
        out = twin(x[i:i + 1]).reshape(-1)
        sq = 0.0
        for j in range(out.numel()):
            grads = torch.autograd.grad(out[j], params, create_graph=True)
            sq = sq + sum((g ** 2).sum() for g in grads)
        norms.append(sq)
        reg = reg + sq / len(x)
    grads = torch.autograd.grad(reg, params, allow_unused=True)  # (a bias's enters no derivative)
    return torch.stack(norms).detach(), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


@pytest.mark.parametrize("method", ["fast", "vmap", "auto"])
def test_an_embedding_with_max_norm_is_measured_exactly_and_left_unwritten(method):
    model, x = renorming_model()
    before = state(model)
    expected_norms, expected_grad = brute_force(model, x)
    norms = per_sample_sq_grad_norms(model, x, method=method)
    grad = regularizer_grad(model, x, method=method)
    report = RegularizerProbe(model, x, method=method)()
    vector = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    tangent_projection(model, x, vector, method=method)
    after = state(model)
    assert before.keys() == after.keys()
    for name in before:  # every parameter and buffer, bit for bit (the counter too)
        assert torch.equal(before[name], after[name]), name
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(report.per_sample, expected_norms, rtol=1e-10, atol=0)
    for (name, g), e in zip(grad.items(), expected_grad):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12, msg=name)


def test_a_forward_that_writes_a_parameter_is_refused_by_name():
    class Clamping(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            self.lin.weight.detach().clamp_(-0.1, 0.1)  # (in place, bypassing autograd)
            return self.lin(x)

    with pytest.raises(ValueError, match=r"wrote parameter 'lin.weight' in place"):
        per_sample_sq_grad_norms(Clamping().double(), torch.randn(4, 3, dtype=torch.float64), method="fast")


def test_a_monitor_with_a_renorming_model_does_not_change_training():
    def run(probe_every_step):
        model, x = renorming_model()
        y = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        probe = RegularizerProbe(model, x) if probe_every_step else None
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if probe is not None:
                probe()
        return state(model)

    plain, probed = run(False), run(True)
    for name in plain:
        assert torch.equal(plain[name], probed[name]), name


def test_keys_that_share_their_low_32_bits_draw_independent_noise():
    # seed 0, rank 0: steps 161256 and 164575 have keys equal in the low 32 bits, which is all
    # torch's CPU generator keeps of a seed: stream version 1 drew identical noise there
    a, b = stream_key(0, 0, 161256, 0), stream_key(0, 0, 164575, 0)
    assert a & 0xFFFFFFFF == b & 0xFFFFFFFF and a != b
    noise = LabelNoise(0.1)
    draws = []
    for step in (161256, 164575):
        noise.step = step
        draws.append(noise.sample(torch.zeros(64)))
    assert not torch.equal(*draws)
    assert abs(float(torch.corrcoef(torch.stack(draws))[0, 1])) < 0.5


@pytest.mark.parametrize("fixed", ["low", "high"])
def test_a_birthday_search_over_keys_sharing_one_word_finds_no_collision(fixed):
    # 2^14 keys with one 32-bit word in common: a draw that depended on that word alone would
    # repeat in all of them; 52 independent bits per key collide with probability 2^-25
    g, device = torch.Generator(), torch.device("cpu")
    word = 0x9E3779B9
    keys = [(word << 32 | i) if fixed == "high" else (i << 32 | word) for i in range(1, 1 << 14)]
    first = {int(uniform_bits(g, key, torch.Size([1]), device)) for key in keys}
    assert len(first) == len(keys)


def test_swapped_words_do_not_repeat_a_draw():
    g, device = torch.Generator(), torch.device("cpu")
    low, high = 0x12345678, 0x9ABCDEF0
    a = uniform_bits(g, high << 32 | low, torch.Size([16]), device)
    b = uniform_bits(g, low << 32 | high, torch.Size([16]), device)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_flips_reach_every_class_in_every_integer_dtype(dtype):
    classes = min(200, torch.iinfo(dtype).max + 1)
    noise = LabelNoise(distribution="flip", p=1.0, num_classes=classes)
    labels = torch.ones(40000, dtype=dtype)
    flipped = noise.perturb(labels)
    assert flipped.dtype == dtype
    counts = torch.bincount(flipped.long(), minlength=classes)
    assert counts[1] == 0 and (counts[torch.arange(classes) != 1] > 0).all()
    assert int(flipped.long().max()) == classes - 1


def test_labels_whose_dtype_cannot_hold_the_classes_are_refused():
    noise = LabelNoise(distribution="flip", p=0.5, num_classes=200)
    with pytest.raises(ValueError, match=r"torch\.int8 hold at most 128 classes, not num_classes=200"):
        noise.perturb(torch.tensor([1, 2], dtype=torch.int8))


@pytest.mark.parametrize("name", IDS)
def test_the_probe_leaves_every_parameter_and_buffer_of_the_battery_as_found(name):
    model, x = make(name)
    before = state(model)
    grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    RegularizerProbe(model, x)()
    after = state(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p, g in zip(model.parameters(), grads_before) if g is None)
