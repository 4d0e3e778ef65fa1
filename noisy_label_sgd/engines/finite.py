"""NaN and Inf refused before a measurement starts: in any parameter or any floating-point input.

A NaN parameter would otherwise come out as NaN norms from one engine, as ``linalg.eigh: The
algorithm failed to converge`` from the dense projection, or as "samples are not independent" from
the model check: every public function raises the same ValueError instead, before the model runs.
The check costs a handful of operations and no host synchronisation (an asynchronous assert): on
the CPU it raises at once; on a GPU a failed check is a device-side assert that stops the run at
its next synchronisation (as the label-noise target check does).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import Batch


def check_finite(model: nn.Module, batch: Batch) -> None:
    """Raise ValueError naming the first parameter or input holding a NaN or an Inf."""
    named = [(f"parameter {name!r}", p) for name, p in model.named_parameters()]
    named += [(f"input {i}", t) for i, t in enumerate(batch) if t.is_floating_point()]
    named = [(what, t) for what, t in named if t.numel() > 0 and t.device.type != "meta"]
    if not named:
        return
    with torch.no_grad():
        # one max |x| per tensor in one foreach operation: NaN or Inf wherever a tensor holds one
        largest = torch.stack(torch._foreach_norm([t for _, t in named], math.inf))
        ok = largest.isfinite().all()
    try:
        torch._assert_async(ok, "noisy_label_sgd: a parameter or an input holds NaN or Inf")
    except RuntimeError:  # raised at once where the check runs on the host
        bad = next(what for (what, _), finite in zip(named, largest.isfinite().tolist()) if not finite)
        raise ValueError(
            f"{bad} holds NaN or Inf values: reg, its gradient and the projection are undefined there "
            "(a diverged step? check the learning rate; or NaN in the data)") from None
