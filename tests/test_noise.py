"""LabelNoise: distribution statistics, stream independence and reproducibility, state."""

import math

import pytest
import torch

from noisy_label_sgd import LabelNoise

N = 200_000  # draws per statistic; tolerances below are ~5 standard errors at this size
Z = 5.0


def draw(noise: LabelNoise, n: int = N, dtype=torch.float64) -> torch.Tensor:
    return noise.sample(torch.zeros(n, dtype=dtype))


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "uniform"])
@pytest.mark.parametrize("std", [0.1, 2.5])
def test_additive_mean_and_variance(distribution, std):
    eps = draw(LabelNoise(std, distribution, seed=3))
    # mean: standard error std/sqrt(N)
    assert abs(float(eps.mean())) < Z * std / math.sqrt(N)
    # variance: relative standard error <= sqrt(2/N) for these (kurtosis <= 3) distributions
    assert abs(float(eps.var()) / std**2 - 1) < Z * math.sqrt(2 / N)


def test_distribution_shapes_and_bounds():
    s = 0.7
    rad = draw(LabelNoise(s, "rademacher", seed=1))
    assert set(rad.unique().tolist()) == {-s, s}
    uni = draw(LabelNoise(s, "uniform", seed=1))
    half = math.sqrt(3) * s
    assert float(uni.min()) >= -half and float(uni.max()) <= half
    assert float(uni.min()) < -0.99 * half and float(uni.max()) > 0.99 * half  # fills the range
    gau = draw(LabelNoise(s, "gaussian", seed=1))
    within_one_sigma = float((gau.abs() < s).double().mean())
    se = math.sqrt(0.6827 * 0.3173 / N)
    assert abs(within_one_sigma - 0.682689) < Z * se


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sample_follows_like(dtype):
    like = torch.zeros(4, 3, dtype=dtype)
    eps = LabelNoise(0.1, seed=0).sample(like)
    assert eps.shape == like.shape and eps.dtype == dtype and eps.device == like.device


def test_same_seed_same_stream_and_pure_function_of_counters():
    a, b = LabelNoise(1.0, seed=7), LabelNoise(1.0, seed=7)
    for _ in range(3):
        assert torch.equal(draw(a, 100), draw(b, 100))
        a.advance(), b.advance()
    # a draw depends only on (seed, rank, step, call): jump straight to step 5, call 2
    c, d = LabelNoise(1.0, seed=7), LabelNoise(1.0, seed=7)
    for _ in range(5):
        c.advance()
    draw(c, 100), draw(c, 100)
    d.step, d.call = 5, 2
    assert torch.equal(draw(c, 100), draw(d, 100))
    assert not torch.equal(draw(LabelNoise(1.0, seed=8), 100), draw(LabelNoise(1.0, seed=7), 100))


def test_independence_across_steps_calls_ranks_and_samples():
    bound = Z / math.sqrt(N)
    noise = LabelNoise(1.0, seed=0)
    first_call = draw(noise)
    second_call = draw(noise)  # a second micro-batch in the same step
    noise.advance()
    next_step = draw(noise)
    other_rank = draw(LabelNoise(1.0, seed=0, rank=1))
    assert abs(corr(first_call, second_call)) < bound
    assert abs(corr(first_call, next_step)) < bound
    assert abs(corr(first_call, other_rank)) < bound
    assert abs(corr(first_call[:-1], first_call[1:])) < bound * math.sqrt(2)  # neighbours


def test_rewind_repeats_the_step():
    noise = LabelNoise(1.0, seed=0)
    a = draw(noise, 10)
    b = draw(noise, 10)
    noise.rewind()
    assert torch.equal(draw(noise, 10), a) and torch.equal(draw(noise, 10), b)


def test_std_schedule_is_evaluated_at_the_current_step():
    noise = LabelNoise(lambda step: 1.0 / (1 + step), seed=0)
    for step in range(3):
        assert noise.current_std() == 1.0 / (1 + step)
        eps = draw(noise)
        assert abs(float(eps.std()) * (1 + step) - 1) < 0.02
        noise.advance()


def test_std_zero_gives_exact_zeros():
    assert torch.equal(LabelNoise(0.0).perturb(torch.arange(5.0)), torch.arange(5.0))


@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_flip_rate_never_true_class_and_uniform_over_others(p):
    classes = 5
    noise = LabelNoise(distribution="flip", p=p, num_classes=classes, seed=11)
    y = torch.full((N,), 2, dtype=torch.long)
    flipped = noise.perturb(y)
    assert flipped.dtype == torch.long and flipped.min() >= 0 and flipped.max() < classes
    changed = flipped != y
    rate = float(changed.double().mean())
    assert abs(rate - p) <= Z * math.sqrt(max(p * (1 - p), 1e-12) / N)
    if p > 0:
        counts = torch.bincount(flipped[changed], minlength=classes).double()
        assert counts[2] == 0  # a flipped label is never the true class
        others = counts[[0, 1, 3, 4]]
        m = float(changed.sum())
        q = 1 / (classes - 1)
        assert (others / m - q).abs().max() < Z * math.sqrt(q * (1 - q) / m)


def test_state_dict_round_trip():
    noise = LabelNoise(0.3, "uniform", seed=5)
    for _ in range(4):
        noise.advance()
    draw(noise, 3)
    restored = LabelNoise(0.3, "uniform", seed=5)
    restored.load_state_dict(noise.state_dict())
    assert (restored.step, restored.call) == (4, 1)
    assert torch.equal(draw(restored, 10), draw(noise, 10))


def test_load_state_dict_with_other_configuration_fails_and_changes_nothing():
    noise = LabelNoise(0.3, seed=5)
    saved = LabelNoise(0.3, seed=6)
    saved.advance()
    with pytest.raises(ValueError, match="seed=6"):
        noise.load_state_dict(saved.state_dict())
    assert noise.step == 0


BAD_CONSTRUCTION = [
    (dict(std=-0.1), ValueError, r"Invalid noise std: -0\.1"),
    (dict(std=float("nan")), ValueError, r"Invalid noise std: nan"),
    (dict(std=float("inf")), ValueError, r"Invalid noise std: inf"),
    (dict(std=0.1, distribution="laplace"), ValueError, r"Invalid noise distribution: 'laplace'"),
    (dict(distribution="flip", p=1.5, num_classes=3), ValueError, r"flip probability p: 1\.5"),
    (dict(distribution="flip", p=-0.1, num_classes=3), ValueError, r"flip probability p: -0\.1"),
    (dict(distribution="flip", p=float("nan"), num_classes=3), ValueError, r"p: nan"),
    (dict(distribution="flip", p=0.1), ValueError, r"Invalid num_classes: None"),
    (dict(distribution="flip", p=0.1, num_classes=1), ValueError, r"Invalid num_classes: 1"),
    (dict(std=0.1, p=0.1), ValueError, r"p and num_classes are for distribution='flip'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CONSTRUCTION)
def test_bad_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        LabelNoise(**kwargs)


BAD_TARGETS = [
    (dict(std=0.1), torch.tensor([1.0, float("nan")]), ValueError, r"NaN or Inf.*nan"),
    (dict(std=0.1), torch.tensor([1.0, float("inf")]), ValueError, r"NaN or Inf.*inf"),
    (dict(std=0.1), torch.tensor([1, 2]), TypeError, r"float targets, got dtype torch\.int64"),
    (dict(distribution="flip", p=0.1, num_classes=3), torch.tensor([0.0, 1.0]), TypeError,
     r"needs integer class labels, got dtype torch\.float32"),
    (dict(distribution="flip", p=0.1, num_classes=3), torch.tensor([0, 3]), ValueError,
     r"must lie in \[0, 3\) \(or be ignore_index=-100\), got range \[0, 3\]"),
    (dict(std=0.1), [1.0, 2.0], TypeError, r"targets must be a tensor, got list"),
]


@pytest.mark.parametrize("kwargs,targets,error,message", BAD_TARGETS)
def test_bad_targets_raise_and_change_nothing(kwargs, targets, error, message):
    noise = LabelNoise(**kwargs)
    with pytest.raises(error, match=message):
        noise.perturb(targets)
    assert (noise.step, noise.call, noise.last_noise) == (0, 0, None)


def test_bad_schedule_value_raises_at_draw_time():
    noise = LabelNoise(lambda step: -1.0)
    with pytest.raises(ValueError, match=r"Invalid noise std \(the schedule's value at step 0\): -1\.0"):
        noise.perturb(torch.zeros(3))
    assert noise.call == 0



@pytest.mark.parametrize("check_finite", [True, False])
def test_flip_leaves_ignore_index_labels_untouched(check_finite):
    # as nn.CrossEntropyLoss ignores them: neither refused nor turned into a real class
    noise = LabelNoise(p=1.0, distribution="flip", num_classes=5, check_finite=check_finite)
    labels = torch.tensor([0, -100, 3, -100, 4])
    flipped = noise.perturb(labels)
    assert torch.equal(flipped[labels == -100], labels[labels == -100])
    kept = labels != -100
    assert bool((flipped[kept] != labels[kept]).all()) and bool(((flipped[kept] >= 0) & (flipped[kept] < 5)).all())
    custom = LabelNoise(p=1.0, distribution="flip", num_classes=5, ignore_index=-1).perturb(torch.tensor([-1, 2]))
    assert custom[0] == -1 and custom[1] != 2


def test_a_std_mismatch_on_load_is_reported():
    import warnings

    saved = LabelNoise(std=0.3, seed=1)
    saved.advance()
    resumed = LabelNoise(std=0.1, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(saved.state_dict())
    assert any("std=0.3" in str(w.message) and "std=0.1" in str(w.message) for w in caught)
    assert resumed.step == 1 and resumed.std == 0.1
