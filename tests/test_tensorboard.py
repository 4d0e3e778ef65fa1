"""TensorBoardMonitor: event files read back, no effect on training, errors and failures."""

import math
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from helpers import batch, mlp, train
from noisy_label_sgd import LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor

PREFIX = "implicit_reg"
FLOAT32_EVENT_RTOL = 1e-6  # event files store scalars in float32 (eps 1.2e-7)


def dropout_mlp():
    # dropout in train mode draws from the global RNG: a monitor touching it would show here
    model = mlp()
    model.insert(1, nn.Dropout(0.2))
    return model


def train_noisy(model, opt, steps):
    train(model, opt, opt.noisy_loss(nn.MSELoss()), steps)


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
    expected, thetas = {}, {}
    flat_parameters = lambda: torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    def at_the_same_parameters(step):  # the probe directly, and the parameters
        expected[step], thetas[step] = probe(), flat_parameters()

    # training batches of 4 samples, a probe set of 16: the drift prediction must use 4
    with TensorBoardMonitor(probe, log_dir=tmp_path, every=3, batch_size=4) as monitor:
        monitor.attach(opt)  # logs the starting point
        at_the_same_parameters(0)
        # a hook after the monitor's
        opt.register_step_post_hook(
            lambda o, a, k: at_the_same_parameters(opt.label_noise.step) if opt.label_noise.step % 3 == 0 else None)
        train_noisy(model, opt, 10)
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    for name in ("reg", "reg_grad_norm", "manifold_grad_norm", "normal_grad_norm", "manifold_fraction",
                 "probe_loss", "lr", "noise_std", "predicted_drift_per_step", "probe_seconds"):
        assert f"{PREFIX}/{name}" in tags, name
    assert f"{PREFIX}/per_sample_sq_grad_norm" in acc.Tags()["histograms"]
    assert expected[3].manifold_grad.norm().item() == pytest.approx(expected[3].manifold_grad_norm, rel=1e-12)
    for name in ("reg", "reg_grad_norm", "manifold_grad_norm", "normal_grad_norm", "probe_loss"):
        events = acc.Scalars(f"{PREFIX}/{name}")
        assert [e.step for e in events] == [0, 3, 6, 9]
        for e in events:
            want = getattr(expected[e.step], "loss" if name == "probe_loss" else name)
            assert math.isclose(e.value, want, rel_tol=FLOAT32_EVENT_RTOL), (name, e.step)
    for e in acc.Scalars(f"{PREFIX}/predicted_drift_per_step"):
        # eta_eff^2 sigma^2 / (B k^2) |P_T grad reg| with eta_eff = 0.05 / (1 - 0.5) = 0.1,
        # sigma = 0.3, B = 4, k = 3: 0.01 * 0.09 / 36 = 2.5e-5
        assert math.isclose(e.value, 2.5e-5 * expected[e.step].manifold_grad_norm, rel_tol=FLOAT32_EVENT_RTOL)
    for e in acc.Scalars(f"{PREFIX}/predicted_probe_loss"):
        # eta_eff sigma^2 / (B k^2) reg = 0.1 * 0.09 / 36 reg = 2.5e-4 reg
        assert math.isclose(e.value, 2.5e-4 * expected[e.step].reg, rel_tol=FLOAT32_EVENT_RTOL)
    observed = acc.Scalars(f"{PREFIX}/observed_drift_per_step")
    assert [e.step for e in observed] == [3, 6, 9]
    for e in observed:  # the move along the previous probe's -P_T grad reg, per step
        direction = expected[e.step - 3].manifold_grad
        moved = -(thetas[e.step] - thetas[e.step - 3]).dot(direction) / direction.norm()
        assert math.isclose(e.value, float(moved) / 3, rel_tol=FLOAT32_EVENT_RTOL)
    assert [e.value for e in acc.Scalars(f"{PREFIX}/lr")] == pytest.approx([0.05] * 4)
    assert [e.value for e in acc.Scalars(f"{PREFIX}/jacobian_rank")] == [expected[s].jacobian_rank for s in (0, 3, 6, 9)]
    hist = acc.Histograms(f"{PREFIX}/per_sample_sq_grad_norm")
    assert [h.step for h in hist] == [0, 3, 6, 9] and hist[0].histogram_value.num == 16


def read_hparams(log_dir) -> dict:
    """The hyperparameters of the run's hparams session, read back from its event files."""
    import glob

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for path in glob.glob(str(log_dir / "events.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    for name, v in data.session_start_info.hparams.items():
                        found[name] = v.string_value if v.WhichOneof("kind") == "string_value" else v.number_value
    return found


def test_layout_and_hparams_are_written_and_read_back(tmp_path):
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, momentum=0.9, noise_std=0.3, distribution="rademacher")
    x, y = batch(0)
    with TensorBoardMonitor(RegularizerProbe(model, x, y), log_dir=tmp_path, every=1, batch_size=8,
                            hparams={"width": 16}) as monitor:
        monitor.attach(opt)
        train_noisy(model, opt, 1)
    assert read_hparams(tmp_path) == {"batch_size": 8, "probe_every": 1, "lr": 0.05, "momentum": 0.9,
                                      "noise_distribution": "rademacher", "noise_std": 0.3, "width": 16}
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    import glob

    plugins = set()
    for path in glob.glob(str(tmp_path / "events.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                plugins.add(value.metadata.plugin_data.plugin_name)
    assert {"custom_scalars", "hparams"} <= plugins


def test_a_classifier_with_flips_logs_cross_entropy_accuracy_and_the_flip_probability(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    x, labels = batch(0)[0], torch.randint(0, 3, (16,))
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, distribution="flip", p=0.25, num_classes=3, seed=1)
    probe = RegularizerProbe(model, x, labels)
    reports = {}
    with TensorBoardMonitor(probe, log_dir=tmp_path, every=2) as monitor:
        monitor.attach(opt)
        reports[0] = monitor.last_report
        loss_fn = opt.noisy_loss(nn.CrossEntropyLoss())
        for step in range(1, 5):
            opt.zero_grad()
            loss_fn(model(x), labels).backward()
            opt.step()
            if step % 2 == 0:
                reports[step] = monitor.last_report
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {f"{PREFIX}/{name}" for name in ("probe_loss", "probe_accuracy", "flip_p", "reg")} <= tags
    assert not {f"{PREFIX}/{name}" for name in ("noise_std", "predicted_probe_loss", "predicted_drift_per_step")} & tags
    assert [e.value for e in acc.Scalars(f"{PREFIX}/flip_p")] == [0.25] * 3
    for name, field in (("probe_loss", "loss"), ("probe_accuracy", "accuracy")):
        events = acc.Scalars(f"{PREFIX}/{name}")
        assert [e.step for e in events] == [0, 2, 4]
        for e in events:
            assert math.isclose(e.value, getattr(reports[e.step], field), rel_tol=FLOAT32_EVENT_RTOL), (name, e.step)
    with torch.no_grad():  # the last probe's loss is the clean cross-entropy of the trained model
        assert math.isclose(reports[4].loss, float(nn.functional.cross_entropy(model(x), labels)), rel_tol=1e-12)
    assert read_hparams(tmp_path)["flip_p"] == 0.25


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_drift_prediction_takes_the_batch_size_the_loss_hook_saw(tmp_path, micro_batches):
    # training batches of 4 samples (twice 4 with gradient accumulation), a probe set of 16: the
    # README's case, where B used to be the probe set's size
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.02, noise_std=0.5)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    x, y = batch(0)  # 16 samples, 3 outputs
    with TensorBoardMonitor(RegularizerProbe(model, x, y), log_dir=tmp_path, every=1) as monitor:
        monitor.attach(opt)
        opt.zero_grad()
        for m in range(micro_batches):
            xb, yb = batch(10 + m, n=4)
            (loss_fn(model(xb), yb) / micro_batches).backward()
        opt.step()
    B = 4 * micro_batches
    # 0.02^2 * 0.5^2 / (B * 3^2) = 1e-4 / (9 B)
    assert read_hparams(tmp_path)["batch_size"] == B
    [event] = read_events(tmp_path).Scalars(f"{PREFIX}/predicted_drift_per_step")
    assert math.isclose(event.value, 1e-4 / (9 * B) * monitor.last_report.manifold_grad_norm,
                        rel_tol=FLOAT32_EVENT_RTOL)


def test_no_drift_prediction_for_an_optimizer_it_does_not_hold_for(tmp_path):
    from noisy_label_sgd import add_label_noise, noisy_loss

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = noisy_loss(nn.MSELoss(), add_label_noise(opt, std=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TensorBoardMonitor(RegularizerProbe(model, batch(0)[0]), log_dir=tmp_path, every=1) as monitor:
            monitor.attach(opt)
            train(model, opt, loss_fn, 3)
    said = [str(w.message) for w in caught if "predicted_drift_per_step" in str(w.message)]
    assert len(said) == 1 and "Adam" in said[0]
    tags = set(read_events(tmp_path).Tags()["scalars"])
    assert f"{PREFIX}/predicted_drift_per_step" not in tags
    assert {f"{PREFIX}/reg", f"{PREFIX}/noise_std", f"{PREFIX}/lr"} <= tags


def test_float32_monitor_logs_what_float64_logs(tmp_path):
    # the same model and data in float32 and float64, trained without noise (a noise draw depends
    # on the dtype, so noisy runs would part): the logged values agree to float32 precision (the
    # manifold part within the projection's float32 tolerance)
    from helpers import FLOAT32_PROJECTION_RTOL, FLOAT32_RTOL

    logged = {}
    for dtype in (torch.float64, torch.float32):
        model = mlp().to(dtype)  # one float64 initialisation, and the data, cast
        opt = LabelNoiseSGD(model.parameters(), lr=0.05, noise_std=0.0)
        x, y = (t.to(dtype) for t in batch(99, n=6))
        with TensorBoardMonitor(RegularizerProbe(model, x, y), log_dir=tmp_path / str(dtype), every=2) as monitor:
            monitor.attach(opt)
            loss_fn = opt.noisy_loss(nn.MSELoss())
            for step in range(4):
                xb, yb = (t.to(dtype) for t in batch(step))
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
        acc = read_events(tmp_path / str(dtype))
        logged[dtype] = {name: [e.value for e in acc.Scalars(f"{PREFIX}/{name}")]
                         for name in ("reg", "reg_grad_norm", "manifold_grad_norm", "probe_loss")}
    for name, values in logged[torch.float64].items():
        rtol = FLOAT32_PROJECTION_RTOL if name == "manifold_grad_norm" else FLOAT32_RTOL
        assert len(values) == 3  # at attach, steps 2 and 4
        for a, b in zip(logged[torch.float32][name], values):
            assert math.isclose(a, b, rel_tol=rtol), (name, a, b)


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
        train_noisy(model, opt, 8)
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
        if len(calls) in (2, 3):  # (the first call: at attach)
            raise RuntimeError("out of memory")
        return real()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TensorBoardMonitor(flaky_probe, log_dir=tmp_path, every=1) as monitor:
            monitor.attach(opt)
            train_noisy(model, opt, 5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "out of memory" in messages[0] and "step 1" in messages[0]
    assert monitor.failures == 2 and opt.label_noise.step == 5
    assert [e.step for e in read_events(tmp_path).Scalars(f"{PREFIX}/reg")] == [0, 3, 4, 5]


def test_a_probe_that_cannot_work_raises_at_attach_and_leaves_the_optimizer_alone(tmp_path):
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, noise_std=0.3)

    def broken_probe():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monitor = TensorBoardMonitor(broken_probe, log_dir=tmp_path, every=1)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        monitor.attach(opt)
    train_noisy(model, opt, 2)  # no hook left behind: nothing warns, nothing is logged
    assert monitor.failures == 0 and monitor.global_step == 0
    monitor.close()


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


def test_the_progress_bar_times_its_eta_from_after_the_first_step(tmp_path):
    # the first probe (at attach) and the first step are warm-up: the ETA is timed after them,
    # with every step still counted
    import io

    tqdm = pytest.importorskip("tqdm")
    model = mlp()
    opt = LabelNoiseSGD(model.parameters(), lr=0.05, noise_std=0.1)
    bar = tqdm.tqdm(total=5, file=io.StringIO(), mininterval=0)
    monitor = TensorBoardMonitor(RegularizerProbe(model, *batch(0)), log_dir=tmp_path, every=10, progress=bar)
    monitor.attach(opt)
    created = bar.start_t
    loss_fn = opt.noisy_loss(nn.MSELoss())
    ends = []
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        before = bar._time()
        opt.step()
        ends.append((before, bar.start_t))
    assert bar.n == 3 and bar.total == 5
    first_before, first_start = ends[0]
    assert first_start >= first_before > created  # restarted at the end of step 1 ...
    assert ends[1][1] == ends[2][1] == first_start  # ... and only then
    assert bar.format_dict["elapsed"] < bar._time() - created
    monitor.close()


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
    assert [e.step for e in read_events(tmp_path).Scalars(f"{PREFIX}/reg")] == [0, 2, 4]
