"""A Lightning run under DDP (ddp_spawn, gloo, 2 CPU processes) with label noise and the probe
callback, run as a script by tests/test_integrations.py: prints the logged reg per step and the
final model's reg, as JSON."""

import csv
import glob
import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from noisy_label_sgd import RegularizerProbe, add_label_noise, implicit_regularizer, noisy_loss
from noisy_label_sgd.integrations.lightning import ProbeCallback

N = 16


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        self.loss_fn = noisy_loss(nn.MSELoss(), add_label_noise(opt, std=0.3, seed=4))
        return opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*regression_data()), batch_size=4)


if __name__ == "__main__":
    out = sys.argv[1]
    module = Regression()
    x, y = regression_data()
    # every rank probes the whole set (its "shard"): the union's reg is the set's own
    callback = ProbeCallback(RegularizerProbe(module.net, x, y), every=2)
    trainer = pl.Trainer(max_steps=6, strategy="ddp_spawn", devices=2, accelerator="cpu",
                         logger=CSVLogger(out, name="run"), callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module)  # (ddp_spawn brings rank 0's trained weights back into this process)
    (metrics,) = glob.glob(os.path.join(out, "run", "version_*", "metrics.csv"))
    rows = [(int(r["step"]), float(r["implicit_reg/reg"])) for r in csv.DictReader(open(metrics))
            if r.get("implicit_reg/reg")]
    print(json.dumps({"logged": rows, "final_reg": float(implicit_regularizer(module.net, x))}))
