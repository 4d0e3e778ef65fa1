"""The paper examples run end to end in --quick mode and write what they promise."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
# The tests are bounded by the work they ask for (steps, sizes), not by time: this is only a
# guard against a hang, far above any run on a busy machine (the slowest here is 75 s when idle).
HANG_GUARD_S = 1800


# The CPU kernels the stored summaries were made with: torch's own (ATen), oneDNN's and MKL's
# picked for AVX2. On a CPU with AVX-512 they would otherwise take wider kernels, whose float32
# sums round differently: over the flip example's 3000 steps that moved reg by 2-3% (an AMD EPYC
# with AVX-512, 2026-12-04; the same numbers bit for bit with these set). No-ops on an AVX2 CPU.
SAME_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run_example(name, *options):
    """One torch thread unless told otherwise: beside other work torch's thread per core waits on
    the busy cores (12x slower for the flip example with both cores taken), and a run's numbers
    are reproducible bit for bit only at the thread count and the kernels they were made with."""
    threads = () if "--threads" in options else ("--threads", "1")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, f"{name}.py"), *threads, *options],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, **SAME_KERNELS})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """Runs an example once per set of options for the whole module: (output directory, process)."""
    done = {}

    def run(name, *options):
        if (name, options) not in done:
            out = tmp_path_factory.mktemp(name)
            done[name, options] = out, run_example(name, *options, "--out", str(out))
        return done[name, options]

    return run
CASES = {
    "matrix_sensing": ({"train_loss", "test_error", "sq_frobenius_U", "reg", "manifold_grad_norm"}, ["."]),
    "relu_1d": ({"median_curve_length", "median_seed_convexity_changes", "per_seed"}, ["seed0", "seed1"]),
    "sigmoid_single_point": ({"active_units", "unit_types", "units", "reg", "train_loss"}, ["."]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_quick_run_writes_figure_summary_and_logs(name, example_run):
    keys, run_parents = CASES[name]
    out, proc = example_run(name, "--quick")
    assert "tensorboard --logdir" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    machine = summary["machine"]  # what the times and probe costs were measured on
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__ and machine["wall_seconds"] > 0
    assert machine["torch_threads"] >= 1 and machine["cpu_count"] == os.cpu_count()
    assert all(len(machine["load_average_1_5_15_min"][when]) == 3 for when in ("start", "end"))
    for run in ("with_noise", "without_noise"):
        assert keys <= set(summary[run]), (run, set(summary[run]))
        for parent in run_parents:
            assert glob.glob(str(out / parent / run / "events.out.tfevents.*")), (parent, run)
    png = out / f"{name}.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ddp_example_with_torchrun_and_resume(tmp_path):
    out = tmp_path / "ddp"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(EXAMPLES, "ddp_training.py"), "--threads", "1", "--every", "10", "--save-every", "10", "--out", str(out)]
    first = subprocess.run(base + ["--steps", "20"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "2 ranks (DDP), 20 steps" in first.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["optimizer"]["param_groups"][0]["label_noise"]["step"] == 20
    resumed = subprocess.run(base + ["--steps", "30", "--resume"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "2 ranks (DDP), 30 steps" in resumed.stdout
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 2  # rank 0 only, one per launch
    # a finished run resumed again: says so, trains nothing, logs nothing, leaves the checkpoint
    again = subprocess.run(base + ["--steps", "30", "--resume"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "at step 30: nothing left to run" in again.stdout and "ranks, 30 steps" not in again.stdout
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 30


def test_fsdp2_example_with_torchrun_resumes_as_the_uninterrupted_run(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def run(out, steps, *options):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             os.path.join(EXAMPLES, "ddp_training.py"), "--fsdp", "--threads", "1", "--every", "10",
             "--save-every", "10", "--out", str(out), "--steps", str(steps), *options],
            capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"2 ranks (FSDP2), {steps} steps" in done.stdout
        return done.stdout

    run(tmp_path / "resumed", 20)
    resumed = run(tmp_path / "resumed", 30, "--resume")
    whole = run(tmp_path / "whole", 30)
    assert resumed.splitlines()[-2] == whole.splitlines()[-2]  # the final probe report
    states = {}
    for name in ("resumed", "whole"):
        assert (tmp_path / name / "latest").read_text() == "dcp-30"
        assert sorted(p.name for p in (tmp_path / name).glob("dcp-*")) == ["dcp-30"]  # older ones removed
        dcp_to_torch_save(tmp_path / name / "dcp-30", tmp_path / f"{name}.pt")
        states[name] = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    assert states["resumed"]["step"] == 30
    assert states["resumed"]["optim"]["param_groups"][0]["label_noise"] == \
        states["whole"]["optim"]["param_groups"][0]["label_noise"]
    for name, value in states["whole"]["model"].items():
        assert torch.equal(states["resumed"]["model"][name], value), name


def test_relu_1d_seed_chooses_the_initialisations(example_run):
    # --seed S trains seeds S, S+1, ...: another S gives other initialisations and other fits
    summaries = {}
    for seed, options in ((0, ("--quick",)), (7, ("--quick", "--seed", "7", "--threads", "2"))):
        out, _ = example_run("relu_1d", *options)
        summaries[seed] = json.loads((out / "summary.json").read_text())
        assert summaries[seed]["with_noise"]["seeds"] == [seed, seed + 1]
        assert (out / f"seed{seed + 1}" / "with_noise").is_dir()
    lengths = {seed: [r["curve_length"] for r in s["with_noise"]["per_seed"]] for seed, s in summaries.items()}
    assert lengths[0] != lengths[7]
    assert [summaries[seed]["machine"]["torch_threads"] for seed in (0, 7)] == [1, 2]  # applied and recorded


def test_theory_check_quick_run_reports_each_prediction_beside_its_measurement(tmp_path):
    out = tmp_path / "theory"
    run_example("theory_check", "--quick", "--out", str(out))
    setting = json.loads((out / "summary.json").read_text())["tanh_single_point"]
    for section, keys in {"timescale": ("spread_steps", "spread_rescaled"),
                          "drift": ("mean_cosine", "median_length_ratio"), "ou": ("measured", "predicted")}.items():
        for key in keys:
            assert isinstance(setting[section][key], float), (section, key)
    assert setting["drift"]["windows"] >= 3 and setting["ou"]["predicted"] > 0
    assert -1 <= setting["drift"]["mean_cosine"] <= 1
    assert set(setting["checks"]) == {"timescale.spread_rescaled", "timescale.spread_steps", "drift.mean_cosine",
                                      "drift.median_length_ratio", "ou.relative_error"}
    runs = glob.glob(str(out / "tanh_single_point" / "*" / "events.out.tfevents.*"))
    assert len(runs) == 4  # one TensorBoard run per (lr, std) pair
    png = out / "theory_check.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


PAPER_SIZES = {"matrix_sensing": {"d": 100, "r": 5, "n": 2500}, "relu_1d": {"width": 1000, "seeds": 5},
               "sigmoid_single_point": {"width": 100}}


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_paper_presets_run_a_few_steps_at_the_papers_sizes(name, tmp_path):
    out = tmp_path / name
    run_example(name, "--paper", "--max-steps", "3", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert {k: config[k] for k in PAPER_SIZES[name]} == PAPER_SIZES[name] and config["steps"] == 3
    assert {"with_noise", "without_noise"} <= set(summary)
    assert (out / f"{name}.png").stat().st_size > 10_000


def test_explicit_penalty_quick_run_lowers_reg_and_test_error(example_run):
    out, _ = example_run("explicit_penalty", "--quick")
    summary = json.loads((out / "summary.json").read_text())
    with_, without = summary["with_penalty"], summary["without_penalty"]
    # 300 steps at d=12: the penalised run already ends lower in reg and test error
    assert with_["reg"] < without["reg"] and with_["test_error"] < without["test_error"]
    assert with_["train_loss"] < 0.01
    png = out / "explicit_penalty.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparse_quadratic_label_noise_finds_the_sparse_truth_and_parameter_noise_does_not(example_run):
    # the default run (about 20 s): the claim of HaoChen et al. as the issue states it
    out, _ = example_run("sparse_quadratic")
    summary = json.loads((out / "summary.json").read_text())
    runs = {k: summary[k] for k in ("label_noise", "parameter_noise", "no_noise")}
    assert all(r["train_loss"] <= 1e-3 for r in runs.values()), runs
    label = runs["label_noise"]["test_error"]
    assert label <= 0.1 * runs["parameter_noise"]["test_error"] and label <= 0.1 * runs["no_noise"]["test_error"]
    assert runs["label_noise"]["mass_off_support"] < 0.1 < runs["parameter_noise"]["mass_off_support"]
    png = out / "sparse_quadratic.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flip_classification_flips_lower_reg_at_full_training_accuracy(example_run):
    # the default run (about 30 s); the clean loss's sharpness is reported, not asserted: it
    # comes out higher with flips (see the example's docstring and the README)
    pytest.importorskip("sklearn")
    out, _ = example_run("flip_classification")
    summary = json.loads((out / "summary.json").read_text())
    for run in ("with_flips", "without_flips"):
        for key in ("test_accuracy", "train_accuracy", "reg", "sharpness", "gauss_newton_top_eigenvalue",
                    "probe_loss", "probe_accuracy"):
            assert isinstance(summary[run][key], float), (run, key)
        assert summary[run]["probe_method"] == "fast"  # (conv, GroupNorm, Linear: closed forms)
        assert summary[run]["probe_accuracy"] == summary[run]["train_accuracy"] == 1.0  # (the probe set: 200 of them)
    png = out / "flip_classification.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with_, without = summary["with_flips"], summary["without_flips"]
    assert with_["train_accuracy"] == without["train_accuracy"] == 1.0
    assert with_["reg"] < 0.1 * without["reg"]
    assert with_["gauss_newton_top_eigenvalue"] < 0.1 * without["gauss_newton_top_eigenvalue"]


def test_matrix_sensing_noiseless_run_plateaus_while_label_noise_reaches_the_truth(tmp_path):
    # the default setting (d=50, r=3, n = 4 d r) at 6000 steps (about 15 s): plain gradient
    # descent is at zero error within about 3000 steps, far from X*, and stays there
    out = tmp_path / "ms"
    run_example("matrix_sensing", "--steps", "6000", "--every", "3000", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    without, with_ = summary["without_noise"], summary["with_noise"]
    assert without["train_loss"] <= 1e-6 and without["test_error_rel_change_last_quarter"] <= 0.02
    assert without["test_error"] > 1.0
    assert with_["test_error"] <= 0.05 and with_["train_loss"] <= 1e-3
    assert summary["config"]["n"] == 600


# -- the README's numbers, rendered from summaries (tools/readme_numbers.py) --------------------


DEFAULT_RUNS = ("sparse_quadratic", "flip_classification")  # (the tests above run their defaults)


def readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", os.path.join(ROOT, "tools", "readme_numbers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_numbers_are_the_stored_summaries_rendered(tmp_path, capsys):
    numbers = readme_numbers()
    assert numbers.main(["--check"]) == 0
    # a stale number is caught, and named by its block
    readme = open(numbers.README).read()
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("<!-- numbers: flip_classification -->\nMeasured",
                                    "<!-- numbers: flip_classification -->\nMeasured once"))
    assert numbers.main(["--check", "--readme", str(stale)]) == 1
    assert "stale README blocks: flip_classification" in capsys.readouterr().out


def test_readme_numbers_render_from_fresh_summaries(example_run, tmp_path):
    # every block renders from what the examples write now (no key the script reads is gone),
    # and the fresh numbers are what lands in the README: quick runs, and the default runs the
    # tests make anyway
    pytest.importorskip("sklearn")
    numbers = readme_numbers()
    for name in numbers.EXAMPLES:
        out, _ = example_run(name, *(() if name in DEFAULT_RUNS else ("--quick",)))
        (tmp_path / name).mkdir()
        shutil.copyfile(out / "summary.json", tmp_path / name / "summary.json")
    readme = open(numbers.README).read()
    fresh = numbers.render(readme, str(tmp_path))
    assert fresh != readme
    quick = json.loads((tmp_path / "relu_1d" / "summary.json").read_text())["with_noise"]
    assert f"median curve length {quick['median_curve_length']:.3f}" in fresh
    assert numbers.render(fresh, numbers.STORED) == readme  # only the blocks changed


@pytest.mark.parametrize("name", DEFAULT_RUNS)
def test_default_runs_reproduce_the_readme_numbers(name, example_run, tmp_path):
    # deterministic defaults (seeded data, initialisation, batches and noise): the run the tests
    # repeat anyway gives the stored summary's numbers, as rendered
    pytest.importorskip("sklearn")
    numbers = readme_numbers()
    out, _ = example_run(name)
    (tmp_path / name).mkdir()
    shutil.copyfile(out / "summary.json", tmp_path / name / "summary.json")
    fresh = json.loads((out / "summary.json").read_text())
    stored = json.load(open(os.path.join(numbers.STORED, name, "summary.json")))
    assert fresh["config"] == stored["config"]
    assert fresh["machine"]["torch_threads"] == stored["machine"]["torch_threads"] == 1  # (see run_example)
    assert numbers.render_block(name, str(tmp_path)) == numbers.render_block(name, numbers.STORED)
