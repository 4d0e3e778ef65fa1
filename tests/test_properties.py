"""Issue 30: property tests (hypothesis, derandomized so that the suite is deterministic)."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from noisy_label_sgd import LabelNoise, LabelNoiseSGD

PROPERTIES = settings(max_examples=25, deadline=None, derandomize=True)
COUNTER = st.integers(min_value=0, max_value=2**64 - 1)
DISTRIBUTION = st.sampled_from(["gaussian", "rademacher", "uniform"])


def draw(noise, seed, rank, step, call, shape=(6,)):
    noise.seed, noise.rank, noise.step, noise.call = seed, rank, step, call
    return noise.sample(torch.zeros(shape, dtype=torch.float64))


@PROPERTIES
@given(COUNTER, COUNTER, COUNTER, COUNTER, st.integers(0, 3), DISTRIBUTION)
def test_a_draw_is_a_function_of_its_key_and_changes_with_every_field(seed, rank, step, call, field, distribution):
    noise = LabelNoise(0.5, distribution)
    key = [seed, rank, step, call]
    first, again = draw(noise, *key), draw(copy.deepcopy(noise), *key)
    assert torch.equal(first, again)
    other = list(key)
    other[field] = (other[field] + 1) % 2**64
    assert not torch.equal(first, draw(noise, *other))


@PROPERTIES
@given(st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]), st.integers(2, 100),
       st.floats(0.05, 0.95), COUNTER)
def test_flips_keep_the_dtype_the_range_and_the_rate(dtype, classes, p, seed):
    classes = min(classes, torch.iinfo(dtype).max + 1)
    noise = LabelNoise(distribution="flip", p=p, num_classes=classes, seed=seed)
    labels = torch.randint(0, classes, (4000,), generator=torch.Generator().manual_seed(0)).to(dtype)
    flipped = noise.perturb(labels)
    assert flipped.dtype == dtype and 0 <= int(flipped.min()) and int(flipped.max()) < classes
    rate = float((flipped != labels).double().mean())
    assert abs(rate - p) < 5 * (p * (1 - p) / 4000) ** 0.5  # five standard errors


@PROPERTIES
@given(DISTRIBUTION, st.floats(0.01, 10.0), COUNTER)
def test_additive_noise_has_mean_zero_and_the_asked_std(distribution, std, seed):
    n = 20000
    noise = LabelNoise(std, distribution, seed=seed).sample(torch.zeros(n, dtype=torch.float64))
    assert abs(float(noise.mean())) < 5 * std / n**0.5
    assert abs(float(noise.std()) / std - 1) < 0.05


@PROPERTIES
@given(st.floats(1e-3, 0.5), st.floats(0.0, 0.95), st.floats(0.0, 0.1), st.booleans(), st.integers(0, 2**32))
def test_noise_zero_is_sgd_bit_for_bit(lr, momentum, weight_decay, nesterov, seed):
    nesterov = nesterov and momentum > 0
    torch.manual_seed(seed % 1000)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ours = LabelNoiseSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, noise_std=0.0, seed=seed)
    plain = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                            nesterov=nesterov)
    loss_fn = ours.noisy_loss(nn.MSELoss())
    for _ in range(3):
        ours.zero_grad(), plain.zero_grad()
        loss_fn(model(x), y).backward()
        nn.functional.mse_loss(twin(x), y).backward()
        ours.step(), plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@PROPERTIES
@given(st.integers(0, 6), COUNTER)
def test_save_load_continue_equals_an_uninterrupted_run(stop, seed):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        return model, LabelNoiseSGD(model.parameters(), lr=0.1, momentum=0.9, noise_std=0.3, seed=seed)

    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def steps(model, opt, count):
        loss_fn = opt.noisy_loss(nn.MSELoss())
        for _ in range(count):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    whole, whole_opt = build()
    steps(whole, whole_opt, 7)
    first, first_opt = build()
    steps(first, first_opt, stop)
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    resumed, resumed_opt = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    steps(resumed, resumed_opt, 7 - stop)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
