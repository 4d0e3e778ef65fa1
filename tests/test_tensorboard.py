"""TensorBoardMonitor: event files read back, no effect on training, errors and failures."""

import math
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from helpers import batch, mlp
from noisy_label_sgd import LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor

PREFIX = "implicit_reg"


def dropout_mlp():
    # dropout in train mode draws from the global RNG: a monitor touching it would show here
    model = mlp()
    model.insert(1, nn.Dropout(0.2))
    return model


def train(model, opt, steps):
    loss_fn = opt.noisy_loss(nn.MSELoss())
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def read_events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_every_tag_is_logged_at_multiples_of_every_with_the_probe_values(tmp_path):
    torch.manual_seed(0)  # dropout draws from the global RNG
    model = dropout_mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, momentum=0.5, noise_std=0.3)
    x, y = batch(99)
    probe = RegularizerProbe(model, x, y)
    expected = {}
    with TensorBoardMonitor(probe, log_dir=tmp_path, every=3, batch_size=16) as monitor:
        monitor.attach(opt)
        # a hook after the monitor's: the probe at the same parameters, directly
        opt.register_step_post_hook(
            lambda o, a, k: expected.__setitem__(opt.label_noise.step, probe()) if opt.label_noise.step % 3 == 0 else None)
        train(model, opt, 10)
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    for name in ("reg", "reg_grad_norm", "manifold_grad_norm", "normal_grad_norm", "manifold_fraction",
                 "probe_loss", "lr", "noise_std", "predicted_drift_per_step", "probe_seconds"):
        assert f"{PREFIX}/{name}" in tags, name
    assert f"{PREFIX}/per_sample_sq_grad_norm" in acc.Tags()["histograms"]
    for name in ("reg", "reg_grad_norm", "manifold_grad_norm", "normal_grad_norm", "probe_loss"):
        events = acc.Scalars(f"{PREFIX}/{name}")
        assert [e.step for e in events] == [3, 6, 9]
        for e in events:
            want = getattr(expected[e.step], "loss" if name == "probe_loss" else name)
            assert math.isclose(e.value, want, rel_tol=1e-6), (name, e.step)
    for e in acc.Scalars(f"{PREFIX}/predicted_drift_per_step"):
        r = expected[e.step]
        want = (0.05 / 0.5) ** 2 * 0.3**2 / (16 * 3**2) * r.manifold_grad_norm
        assert math.isclose(e.value, want, rel_tol=1e-6)
    assert [e.value for e in acc.Scalars(f"{PREFIX}/lr")] == pytest.approx([0.05] * 3)
    hist = acc.Histograms(f"{PREFIX}/per_sample_sq_grad_norm")
    assert [h.step for h in hist] == [3, 6, 9] and hist[0].histogram_value.num == 16


def test_layout_and_hparams_are_written(tmp_path):
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, noise_std=0.3)
    x, y = batch(0)
    with TensorBoardMonitor(RegularizerProbe(model, x, y), log_dir=tmp_path, every=1) as monitor:
        monitor.attach(opt)
        train(model, opt, 1)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    import glob

    plugins = set()
    for path in glob.glob(str(tmp_path / "events.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                plugins.add(value.metadata.plugin_data.plugin_name)
    assert {"custom_scalars", "hparams"} <= plugins


def test_monitor_does_not_change_the_trajectory(tmp_path):
    runs = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = dropout_mlp()
        opt = LabelNoiseSGD(model.parameters(), lr=0.05, momentum=0.9, noise_std=0.3)
        if monitored:
            x, y = batch(99)
            monitor = TensorBoardMonitor(RegularizerProbe(model, x, y), log_dir=tmp_path, every=2)
            monitor.attach(opt)
        train(model, opt, 8)
        if monitored:
            monitor.close()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_unwritable_log_dir_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    probe = RegularizerProbe(mlp(), batch(0)[0])
    with pytest.raises(ValueError, match="is not a writable directory"):
        TensorBoardMonitor(probe, log_dir=blocker / "runs")
    with pytest.raises(ValueError, match="exactly one of log_dir and writer"):
        TensorBoardMonitor(probe)
    with pytest.raises(ValueError, match="Invalid every: 0"):
        TensorBoardMonitor(probe, log_dir=tmp_path, every=0)


def test_a_failing_probe_warns_once_and_training_continues(tmp_path):
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, noise_std=0.3)
    real = RegularizerProbe(model, batch(0)[0])
    calls = []

    def flaky_probe():
        calls.append(1)
        if len(calls) in (2, 3):
            raise RuntimeError("out of memory")
        return real()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TensorBoardMonitor(flaky_probe, log_dir=tmp_path, every=1) as monitor:
            monitor.attach(opt)
            train(model, opt, 5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "out of memory" in messages[0] and "step 2" in messages[0]
    assert monitor.failures == 2 and opt.label_noise.step == 5
    assert [e.step for e in read_events(tmp_path).Scalars(f"{PREFIX}/reg")] == [1, 4, 5]


def test_log_on_demand_and_progress_bar(tmp_path):
    tqdm = pytest.importorskip("tqdm")
    model = mlp()
    x, y = batch(0)
    bar = tqdm.tqdm(total=3, disable=True)
    monitor = TensorBoardMonitor(RegularizerProbe(model, x, y), log_dir=tmp_path, progress=bar)
    report = monitor.log(7)
    assert report.reg > 0 and monitor.last_report is report
    assert "reg" in bar.postfix and "loss" in bar.postfix
    monitor.close()
    assert [e.step for e in read_events(tmp_path).Scalars(f"{PREFIX}/reg")] == [7]


def test_steps_are_right_when_noise_is_added_after_the_monitor(tmp_path):
    from noisy_label_sgd import add_label_noise, noisy_loss

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = TensorBoardMonitor(RegularizerProbe(model, batch(0)[0]), log_dir=tmp_path, every=2)
    monitor.attach(opt)
    noise = add_label_noise(opt, std=0.1)  # its step post-hook still runs first
    loss_fn = noisy_loss(nn.MSELoss(), noise)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    monitor.close()
    assert [e.step for e in read_events(tmp_path).Scalars(f"{PREFIX}/reg")] == [2, 4]
