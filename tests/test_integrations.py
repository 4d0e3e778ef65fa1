"""The trainer integrations with the real libraries on CPU: PyTorch Lightning and the Hugging
Face Trainer train a few steps with label noise and log the probe's report through their own
loggers, which the tests read back."""

import csv
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from helpers import assert_rel_close
from noisy_label_sgd import LabelNoise, RegularizerProbe, add_label_noise, implicit_regularizer, noisy_loss

STEPS, EVERY, N = 6, 2, 16


def regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def net(seed=1):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


# -- PyTorch Lightning -----------------------------------------------------------------------


def lightning_regression(x, y, momentum, batch_size):
    """net() as a LightningModule: SGD with label noise (std 0.3, seed 4) on its own loader."""
    import lightning.pytorch as pl

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=momentum)
            self.noise = add_label_noise(opt, std=0.3, seed=4)
            self.loss_fn = noisy_loss(nn.MSELoss(), self.noise)
            return opt

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return self.loss_fn(self.net(inputs), targets)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)

    return Regression()


def test_lightning_trains_with_label_noise_and_logs_the_probe_through_its_logger(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from noisy_label_sgd.integrations.lightning import ProbeCallback

    x, y = regression_data()
    module = lightning_regression(x, y, momentum=0.5, batch_size=N // 2)
    callback = ProbeCallback(RegularizerProbe(module.net, x, y), every=EVERY)
    trainer = pl.Trainer(max_steps=STEPS, logger=CSVLogger(tmp_path, name="run"), callbacks=[callback],
                         accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module)

    # the same training in a plain loop: Lightning's closure sees the same noise, step by step
    reference = net()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.5)
    loss_fn = noisy_loss(nn.MSELoss(), add_label_noise(opt, std=0.3, seed=4))
    for step in range(STEPS):
        half = slice((step % 2) * N // 2, (step % 2 + 1) * N // 2)
        opt.zero_grad()
        loss_fn(reference(x[half]), y[half]).backward()
        opt.step()
    assert module.noise.step == STEPS
    for a, b in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)

    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): float(r["implicit_reg/reg"]) for r in rows if r.get("implicit_reg/reg")}
    assert sorted(logged) == list(range(0, STEPS + 1, EVERY))
    assert_rel_close(logged[STEPS], float(implicit_regularizer(module.net, x)), rtol=1e-6)
    assert logged[0] != logged[STEPS]
    assert {"implicit_reg/manifold_grad_norm", "implicit_reg/probe_loss"} <= set(rows[0])


def test_lightning_callback_metrics_drive_model_checkpoint(tmp_path):
    # implicit_reg/reg in trainer.callback_metrics: ModelCheckpoint keeps the lowest-reg step
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from noisy_label_sgd.integrations.lightning import ProbeCallback

    x, y = regression_data()
    module = lightning_regression(x, y, momentum=0.0, batch_size=N)
    callback = ProbeCallback(RegularizerProbe(module.net, x, y), every=EVERY)
    regs = {}
    record = pl.Callback()  # (runs after ProbeCallback: the value ModelCheckpoint sees)
    record.on_train_batch_end = lambda trainer, *_: regs.setdefault(
        trainer.global_step, trainer.callback_metrics.get("implicit_reg/reg"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="implicit_reg/reg", mode="min", save_top_k=1,
                                 every_n_train_steps=EVERY, filename="{step}")
    trainer = pl.Trainer(max_steps=STEPS, logger=False, callbacks=[callback, record, checkpoint],
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)

    assert regs[1] is None and regs[3] == regs[2]  # (the latest probe stays until the next)
    probed = {step: float(reg) for step, reg in regs.items() if step % EVERY == 0}
    assert sorted(probed) == list(range(EVERY, STEPS + 1, EVERY))
    assert_rel_close(probed[STEPS], float(implicit_regularizer(module.net, x)), rtol=1e-6)
    best = min(probed, key=probed.get)
    assert checkpoint.best_model_score.item() == probed[best]
    assert os.path.basename(checkpoint.best_model_path) == f"step={best}.ckpt"


LIGHTNING_FIT = """
import torch, lightning.pytorch as pl
import noisy_label_sgd.integrations.lightning
class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False).fit(Module())
"""


def test_lightning_integration_silences_lightnings_own_treespec_warning():
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.utilities import _pytree

    with warnings.catch_warnings(record=True) as caught:  # what Lightning's training loop calls
        warnings.simplefilter("always")
        _pytree._tree_flatten(torch.zeros(1))
    if not any("LeafSpec" in str(w.message) for w in caught):
        pytest.skip("this Lightning/torch pair does not warn")
    # a fit in a fresh process (pytest resets warning filters around every test)
    run = subprocess.run([sys.executable, "-c", LIGHTNING_FIT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LeafSpec" not in run.stderr


def test_lightning_under_ddp_logs_each_probe_once_from_rank_zero(tmp_path):
    # two gloo processes (ddp_spawn): every rank runs the distributed probe, one row per probe
    pytest.importorskip("lightning.pytorch")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_workers.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [step for step, _ in result["logged"]]
    assert steps == list(range(0, STEPS + 1, EVERY))
    assert_rel_close(result["logged"][-1][1], result["final_reg"], rtol=1e-6)


def test_lightning_callback_probes_on_every_rank_and_logs_from_rank_zero_only():
    # under DDP every rank calls the (distributed) probe; only global rank zero writes
    pytest.importorskip("lightning.pytorch")
    from types import SimpleNamespace

    from noisy_label_sgd.integrations.lightning import ProbeCallback

    x, y = regression_data()
    probe = RegularizerProbe(net(), x, y)
    written = {0: [], 1: []}
    for rank in (0, 1):
        logger = SimpleNamespace(log_metrics=lambda metrics, step, rank=rank: written[rank].append((step, metrics)))
        trainer = SimpleNamespace(global_step=0, is_global_zero=rank == 0, loggers=[logger])
        module_logged = []  # LightningModule.log: callback_metrics on every rank, not the loggers
        module = SimpleNamespace(log=lambda name, value, **options: module_logged.append((name, options["logger"])))
        callback = ProbeCallback(probe, every=EVERY)
        callback.on_train_start(trainer, module)
        for step in (1, 2, 2, 3):  # (2 twice: gradient accumulation ends two batches at step 2)
            trainer.global_step = step
            callback.on_train_batch_end(trainer, module, None, None, 0)
        assert callback.last_report is not None
        assert sorted(module_logged) == sorted((f"implicit_reg/{name}", False) for name in probe().scalars())
    assert written[1] == []
    assert [step for step, _ in written[0]] == [0, 2]
    assert written[0][-1][1]["implicit_reg/reg"] == probe().reg


def test_lightning_callback_refuses_bad_arguments():
    pytest.importorskip("lightning.pytorch")
    from noisy_label_sgd.integrations.lightning import ProbeCallback

    with pytest.raises(ValueError, match="every"):
        ProbeCallback(lambda: None, every=0)
    with pytest.raises(TypeError, match="RegularizerProbe"):
        ProbeCallback("probe")


# -- Hugging Face Trainer --------------------------------------------------------------------


class TokenData(torch.utils.data.Dataset):
    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Logits(nn.Module):
    """The classifier's logits as a tensor, for the probe."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits


def tiny_bert(num_labels, seed=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=num_labels,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     problem_type="regression" if num_labels == 1 else "single_label_classification")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.BertForSequenceClassification(config)


def tokens(n=N, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::2, :2] = 0
    return ids, mask


def hf_trainer(model, data, noise, tmp_path, **kwargs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from noisy_label_sgd.integrations.huggingface import LabelNoiseTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=N // 2,
                                          learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                                          logging_steps=STEPS, report_to=[], save_strategy="no", use_cpu=True,
                                          seed=0, data_seed=0, disable_tqdm=True, **kwargs)
    return LabelNoiseTrainer(model=model, args=args, train_dataset=data, label_noise=noise)


def test_hugging_face_trainer_with_label_noise_logs_the_probe_in_its_log_history(tmp_path):
    from noisy_label_sgd.integrations.huggingface import ProbeCallback

    ids, mask = tokens()
    labels = torch.randn(N, generator=torch.Generator().manual_seed(5))
    model = tiny_bert(num_labels=1)
    noise = LabelNoise(0.5, seed=6)
    trainer = hf_trainer(model, TokenData(ids, mask, labels), noise, tmp_path)
    callback = ProbeCallback(RegularizerProbe(Logits(model), (ids, mask)), every=EVERY).attach(trainer)
    drawn = []
    original = noise.perturb
    noise.perturb = lambda targets: drawn.append(noise.step) or original(targets)
    trainer.train()

    assert noise.step == STEPS and drawn == list(range(STEPS))  # one noisy batch per optimizer step
    logged = [(h["step"], h["implicit_reg/reg"]) for h in trainer.state.log_history if "implicit_reg/reg" in h]
    assert [step for step, _ in logged] == list(range(0, STEPS + 1, EVERY))
    assert_rel_close(logged[-1][1], float(implicit_regularizer(Logits(model), (ids, mask))), rtol=1e-6)
    assert logged[0][1] != logged[-1][1]
    assert callback.last_report.method in ("jacobian", "fast")  # (never the vmap path, which cannot run BERT)


def test_hugging_face_trainer_flips_class_labels_and_evaluation_keeps_them_clean(tmp_path):
    ids, mask = tokens()
    labels = torch.arange(N) % 2
    noise = LabelNoise(distribution="flip", p=0.5, num_classes=2, seed=7)
    seen = []
    trainer = hf_trainer(tiny_bert(num_labels=2), TokenData(ids, mask, labels), noise, tmp_path)
    original = noise.perturb
    noise.perturb = lambda targets: seen.append(targets) or original(targets)
    trainer.train()
    assert len(seen) == STEPS
    flipped = noise.last_noise != 0
    assert 0 < int(flipped.sum()) < flipped.numel()  # p = 0.5: some labels flipped, some kept
    trainer.evaluate(TokenData(ids, mask, labels))
    assert len(seen) == STEPS  # evaluation: clean labels, no draw
    assert math.isfinite(trainer.state.log_history[-1]["eval_loss"])


def test_the_hugging_face_probe_callback_must_be_attached():
    pytest.importorskip("transformers")
    from noisy_label_sgd.integrations.huggingface import ProbeCallback

    callback = ProbeCallback(lambda: None)
    with pytest.raises(RuntimeError, match="attach"):
        callback.on_train_begin(None, None, None)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        callback.attach(object())
