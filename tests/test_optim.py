"""LabelNoiseSGD and add_label_noise: exactness, noise per step, closures, resume, bad input."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from noisy_label_sgd import LabelNoise, LabelNoiseSGD, add_label_noise, noisy_loss
from helpers import batch, mlp, train

# one registry of SGD configurations, run through the generic tests
SGD_CONFIGS = [
    (dict(lr=0.05), "plain"),
    (dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), "nesterov + weight decay"),
    (dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3), "momentum + dampening"),
    (dict(lr=0.05, momentum=0.9, foreach=True), "foreach"),
    (dict(lr=0.05, momentum=0.9, foreach=False, maximize=False), "single tensor"),
]


def two_groups(model: nn.Module):
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "weight_decay": 0.0}]


@pytest.mark.parametrize("kwargs,desc", SGD_CONFIGS, ids=[d for _, d in SGD_CONFIGS])
def test_noise_std_zero_is_bit_for_bit_sgd(kwargs, desc):
    ref_model, model = mlp(), mlp()
    ref_opt = torch.optim.SGD(two_groups(ref_model), **kwargs)
    opt = LabelNoiseSGD(two_groups(model), **kwargs, noise_std=0.0)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=10, gamma=0.7)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    train(ref_model, ref_opt, nn.MSELoss(), 100, ref_sched)
    train(model, opt, opt.noisy_loss(nn.MSELoss()), 100, sched)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert opt.label_noise.step == 100


def test_add_label_noise_std_zero_on_adam_is_bit_for_bit():
    ref_model, model = mlp(), mlp()
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    noise = add_label_noise(opt, std=0.0, seed=0)
    train(ref_model, ref_opt, nn.MSELoss(), 100)
    train(model, opt, noisy_loss(nn.MSELoss(), noise), 100)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_noisy_gradient_is_gradient_of_mse_with_perturbed_labels():
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.1, noise_std=0.5, seed=2)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    x, y = batch(0)
    for _ in range(3):  # a few steps so the stream has moved
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        eps = opt.label_noise.last_noise
        grads = [p.grad.clone() for p in model.parameters()]
        expected = torch.autograd.grad(nn.functional.mse_loss(model(x), y + eps), list(model.parameters()))
        assert float(eps.std()) > 0.3
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
        opt.step()


def test_loss_hook_and_forward_hook_give_the_same_gradient():
    model_a, model_b = mlp(), mlp()
    opt_a = LabelNoiseSGD(model_a.parameters(), lr=0.1, noise_std=0.3, seed=4)
    opt_b = LabelNoiseSGD(model_b.parameters(), lr=0.1, noise_std=0.3, seed=4)
    loss_a = opt_a.noisy_loss(nn.MSELoss())
    opt_b.attach_output_noise(model_b)
    for step in range(5):
        x, y = batch(step)
        for model, opt, loss_fn in ((model_a, opt_a, loss_a), (model_b, opt_b, nn.MSELoss())):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
        opt_a.step(), opt_b.step()


def test_noise_is_fresh_each_step_and_each_micro_batch():
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.01, noise_std=1.0)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    seen = []
    for step in range(3):
        opt.zero_grad()
        for micro in range(2):  # gradient accumulation
            x, y = batch(10 * step + micro)
            loss_fn(model(x), y).backward()
            seen.append(opt.label_noise.last_noise.clone())
        opt.step()
    for i in range(len(seen)):
        for j in range(i):
            assert not torch.equal(seen[i], seen[j])


def closure_run(opt, model, loss_fn, steps, draws):
    for step in range(steps):
        x, y = batch(step)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            draws.append((step, loss_fn.noise.last_noise.clone()))
            return loss

        opt.step(closure)


def check_one_draw_per_step(draws, steps):
    by_step = {}
    for step, eps in draws:
        by_step.setdefault(step, []).append(eps)
    assert sorted(by_step) == list(range(steps))
    for step, eps_list in by_step.items():
        assert all(torch.equal(e, eps_list[0]) for e in eps_list)
    firsts = [v[0] for v in by_step.values()]
    assert all(not torch.equal(firsts[i], firsts[i - 1]) for i in range(1, len(firsts)))


def test_lbfgs_through_add_label_noise_sees_one_draw_per_step():
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, line_search_fn="strong_wolfe")
    noise = add_label_noise(opt, std=0.2, seed=0)
    draws = []
    closure_run(opt, model, noisy_loss(nn.MSELoss(), noise), 4, draws)
    assert len(draws) > 8  # the closure really ran several times per step
    check_one_draw_per_step(draws, 4)
    assert noise.step == 4
    assert noise.samples_last_step == 16  # one batch, however often the closure ran


@pytest.mark.parametrize("as_keyword", [False, True])
def test_labelnoisesgd_step_closure_sees_one_draw_per_step(as_keyword):
    model = mlp()
    # a line-search-like optimizer would call the closure several times; SGD calls it once,
    # so count evaluations by calling it inside a step pre-hook as well
    opt = LabelNoiseSGD(model.parameters(), lr=0.01, noise_std=0.2)
    opt.register_step_pre_hook(lambda o, args, kwargs: [(kwargs.get("closure") or args[1])()] and None)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    draws = []
    for step in range(3):
        x, y = batch(step)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            draws.append((step, opt.label_noise.last_noise.clone()))
            return loss

        opt.step(closure=closure) if as_keyword else opt.step(closure)
    check_one_draw_per_step(draws, 3)


def test_step_post_hook_runs_once_per_step_after_plain_sgd_was_built():
    torch.optim.SGD(mlp().parameters(), lr=0.1)  # torch patches SGD.step with its hook runner
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.1, noise_std=0.1)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    loss_fn = opt.noisy_loss(nn.MSELoss())
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert len(calls) == 3 and opt.label_noise.step == 3


def test_state_dict_carries_the_noise_and_load_restores_it():
    opt = LabelNoiseSGD(mlp().parameters(), lr=0.1, noise_std=0.1, seed=3)
    for _ in range(7):
        opt.step()
    state = opt.state_dict()
    assert state["param_groups"][0]["label_noise"]["step"] == 7
    fresh = LabelNoiseSGD(mlp().parameters(), lr=0.1, noise_std=0.1, seed=3)
    fresh.load_state_dict(state)
    assert fresh.label_noise.step == 7
    assert "label_noise" in state["param_groups"][0]  # the caller's dict is not consumed
    assert "label_noise" not in fresh.param_groups[0]  # (nor is the position a hyperparameter)


def test_a_checkpoint_with_the_position_at_the_top_level_still_loads():
    # (where checkpoints had it before it moved into the first parameter group)
    opt = LabelNoiseSGD(mlp().parameters(), lr=0.1, noise_std=0.1, seed=3)
    for _ in range(4):
        opt.step()
    state = opt.state_dict()
    state["label_noise"] = state["param_groups"][0].pop("label_noise")
    fresh = LabelNoiseSGD(mlp().parameters(), lr=0.1, noise_std=0.1, seed=3)
    fresh.load_state_dict(state)
    assert fresh.label_noise.step == 4


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_distributed_checkpoint_state_dicts_carry_the_position_and_their_state_step_trains_nothing(momentum):
    # get_state_dict / set_state_dict keep only per-parameter state and parameter groups, and take
    # a zero-gradient step() to create the state of an optimizer that has none (SGD without momentum)
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.1, momentum=momentum, noise_std=0.1, seed=3)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    _, optim_state = get_state_dict(model, opt)
    assert opt.label_noise.step == 3 and optim_state["param_groups"][0]["label_noise"]["step"] == 3
    fresh_model = mlp(seed=1)
    fresh = LabelNoiseSGD(fresh_model.parameters(), lr=0.1, momentum=momentum, noise_std=0.1, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (no "no label-noise state")
        set_state_dict(fresh_model, fresh, model_state_dict=model.state_dict(), optim_state_dict=optim_state)
    assert fresh.label_noise.step == 3 and fresh.label_noise.call == 0
    assert fresh.state_dict()["param_groups"][0]["label_noise"] == opt.state_dict()["param_groups"][0]["label_noise"]


def test_loading_a_plain_sgd_checkpoint_warns_and_keeps_the_stream():
    plain = torch.optim.SGD(mlp().parameters(), lr=0.1)
    opt = LabelNoiseSGD(mlp().parameters(), lr=0.1, noise_std=0.1)
    with pytest.warns(UserWarning, match="no label-noise state"):
        opt.load_state_dict(plain.state_dict())
    assert opt.label_noise.step == 0


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from helpers import batch, mlp
    from noisy_label_sgd import LabelNoiseSGD

    mode, path, start, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, momentum=0.9,
                        noise_std=lambda step: 0.5 * 0.97 ** step, seed=9)
    if mode == "resume":
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    loss_fn = opt.noisy_loss(nn.MSELoss())
    for step in range(start, start + steps):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    torch.save({{"model": model.state_dict(), "optimizer": opt.state_dict()}}, path)
    """
)


def test_resume_in_a_fresh_process_is_bit_for_bit(tmp_path):
    import os

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=os.path.dirname(__file__)))
    run = lambda *args: subprocess.run([sys.executable, str(script), *args], check=True)
    run("fresh", str(tmp_path / "full.pt"), "0", "60")
    run("fresh", str(tmp_path / "half.pt"), "0", "30")
    run("resume", str(tmp_path / "half.pt"), "30", "30")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "half.pt", weights_only=True)
    assert resumed["optimizer"]["param_groups"][0]["label_noise"]["step"] == 60
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for key, state in full["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])


BAD_OPTIMIZER = [
    (dict(lr=0.1), TypeError, r"needs noise_std=\.\.\."),
    (dict(lr=0.1, noise_std=-1.0), ValueError, r"Invalid noise std: -1\.0"),
    (dict(lr=0.1, noise_std=float("nan")), ValueError, r"Invalid noise std: nan"),
    (dict(lr=0.1, noise_std=0.1, distribution="cauchy"), ValueError, r"distribution: 'cauchy'"),
    (dict(lr=0.1, noise_std=0.1, distribution="flip"), ValueError, r"std=0\.1 is for additive noise"),
    (dict(lr=0.1, distribution="flip", num_classes=3), ValueError, r"Invalid flip probability p: None"),
    (dict(lr=0.1, noise_std=0.1, noise=LabelNoise(0.1)), ValueError, r"either noise= or its arguments.*noise_std="),
    (dict(lr=0.1, p=0.2, noise=LabelNoise(0.1)), ValueError, r"either noise= or its arguments.*and p=\)"),
    (dict(lr=-0.1, noise_std=0.1), ValueError, r"Invalid learning rate: -0\.1"),
    (dict(lr=0.1, momentum=-0.5, noise_std=0.1), ValueError, r"Invalid momentum value: -0\.5"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_OPTIMIZER)
def test_bad_optimizer_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        LabelNoiseSGD(mlp().parameters(), **kwargs)


def test_add_label_noise_twice_or_on_a_non_optimizer_fails():
    opt = torch.optim.Adam(mlp().parameters())
    add_label_noise(opt, std=0.1)
    with pytest.raises(RuntimeError, match="already attached"):
        add_label_noise(opt, std=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer, got Linear"):
        add_label_noise(nn.Linear(2, 2), std=0.1)



def test_add_label_noise_needs_a_std_for_additive_noise():
    with pytest.raises(TypeError, match="add_label_noise needs std.*std=0.0"):
        add_label_noise(torch.optim.SGD(mlp().parameters(), lr=0.1))
    noise = add_label_noise(torch.optim.SGD(mlp().parameters(), lr=0.1), distribution="flip", p=0.1, num_classes=3)
    assert noise.distribution == "flip"


def test_labelnoisesgd_flips_class_labels_like_sgd_with_add_label_noise():
    # LabelNoiseSGD(distribution="flip", p=, num_classes=) is SGD plus add_label_noise's stream:
    # the same flips, the same parameters after training, and the stream state in its checkpoint
    torch.manual_seed(0)
    x, labels = torch.randn(16, 4), torch.randint(0, 3, (16,))
    runs = {}
    for way in ("labelnoisesgd", "add_label_noise"):
        torch.manual_seed(1)
        model = nn.Linear(4, 3)
        if way == "labelnoisesgd":
            opt = LabelNoiseSGD(model.parameters(), lr=0.1, momentum=0.9, distribution="flip", p=0.3,
                                num_classes=3, seed=5)
            loss_fn = opt.noisy_loss(nn.CrossEntropyLoss())
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            loss_fn = noisy_loss(nn.CrossEntropyLoss(), add_label_noise(opt, distribution="flip", p=0.3,
                                                                        num_classes=3, seed=5))
        flipped = []
        for _ in range(5):
            opt.zero_grad()
            loss_fn(model(x), labels).backward()
            flipped.append(loss_fn.noise.last_noise.clone())
            opt.step()
        runs[way] = (model.weight.detach().clone(), torch.stack(flipped), opt.state_dict()["param_groups"][0]["label_noise"])
    (w1, f1, s1), (w2, f2, s2) = runs.values()
    assert torch.equal(w1, w2) and torch.equal(f1, f2) and s1 == s2
    assert s1["distribution"] == "flip" and s1["p"] == 0.3 and s1["step"] == 5
    assert 0 < int((f1 != 0).sum()) < f1.numel()  # some labels flipped, not all
