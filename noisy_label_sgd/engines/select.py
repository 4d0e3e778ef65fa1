"""Which engine measures a model: chosen once per (model, probe inputs), by :func:`select_engine`.

``method="vmap"`` and ``method="fast"`` name their engine. ``method="auto"`` chooses, looking at
the module types first and running the model only when it must:

0. a caller that will ask everything of one measurement, the projection by the dense solver
   included (``dense_projection``: the probe, unless its solver is "lsqr" or it runs distributed),
   gets the jacobian engine for a small J (at most 64 rows n k and 2^18 entries), whatever the
   layers: one J then answers the norms, grad reg and the projection.
1. every module owning trainable parameters has a closed form (or is
   ``nn.MultiheadAttention``), by its class or, where that has none, by the operations it applies
   (a sizing forward, cached, says: :func:`operations_covered`): the fast engine. Its norms cost about a training step, its grad
   reg a double backward, with no per-sample Jacobian ever formed; where the model turns out to
   need the whole-model path after all (a module returning a non-tuple structure, parameters used
   without calling their module), it hands every question to the vmap engine from then on.
2. otherwise (custom modules: the paper's models, matrix sensing), with the outputs per sample
   k from a one-sample forward: a small J gets the jacobian engine, J formed whole by one batched
   backward; for tiny problems the per-sample paths' fixed costs are many times their
   arithmetic. (A model of closed-form layers asked one question is cheaper on the fast engine.)
3. J that fits the memory budget and the dense solver gets the vmap engine: its grad reg
   (forward-over-reverse) forms J anyway, and that J then gives the norms and the projection.
4. anything larger gets the fast engine with per-module fallbacks for the norms; grad reg then
   comes from torch.func.
"""

from __future__ import annotations

from torch import nn

from .closed_forms import closed_form_layers
from .engine import Engine
from .functional import (Inputs, as_input_tuple, check_chunk_size, check_memory_budget, default_memory_budget,
                         evaluation_mode, unwrapped)
from .jacobian import JacobianEngine, is_small_jacobian
from .preflight import check_model
from .router import Router
from .trace import FastPathUnsupported, one_sample_layout
from .vmap import VmapEngine

METHODS = ("auto", "fast", "vmap")


def check_method(method: str) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (choose one of {METHODS})")


def operations_covered(model: nn.Module, batch) -> bool:
    """Whether a sizing forward (cached) finds a closed form for every module, by the operations
    it applies where its class has none (:mod:`~noisy_label_sgd.engines.ops`)."""
    with evaluation_mode(model):
        try:
            return one_sample_layout(model, batch).covered
        except FastPathUnsupported:
            return False


def select_engine(model: nn.Module, inputs: Inputs, method: str = "auto", *, chunk_size: int | None = None,
                  memory_budget: int | None = None, dense_projection: bool = False) -> Engine:
    """The engine that measures ``model`` on the probe set ``inputs`` (see the module docstring).

    Raises:
        ValueError: an unknown method, a bad chunk_size, an empty or inconsistent probe set, a
            model without trainable parameters or with a BatchNorm without running statistics,
            whose samples are not independent or that uses a trainable parameter under no_grad
            (:func:`~noisy_label_sgd.engines.preflight.check_model`).
        TypeError: inputs that are not tensors, a model that is not an nn.Module.
    """
    check_method(method)
    chunk_size, memory_budget = check_chunk_size(chunk_size), check_memory_budget(memory_budget)
    batch = as_input_tuple(inputs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrapped(model)  # DDP and torch.compile wrappers: the same parameters
    check_model(model, batch)
    if memory_budget is None:
        memory_budget = default_memory_budget(batch[0].device)
    args = (model, batch, chunk_size, memory_budget)
    if method == "vmap":
        return VmapEngine(*args)
    closed_forms = closed_form_layers(model) or operations_covered(model, batch)
    # (a look at the types: some module has no closed form, so grad reg is torch.func's)
    second_order = None if closed_forms else "a module without a closed form needs a per-module fallback"
    if method == "fast":
        return Router(*args, strict=True)
    may_be_small = (dense_projection or not closed_forms) and is_small_jacobian(len(batch[0]), 1)
    if closed_forms and not may_be_small:
        return Router(*args, strict=False)
    engine = VmapEngine(*args)
    with engine.measuring():  # with a one-sample forward for k
        small = is_small_jacobian(engine.rows, engine.fm.num_params)
        fits = engine.jacobian_fits()
    if small:
        return JacobianEngine(*args, k=engine.k)
    if closed_forms:  # (its own sizing forward learns k and the products' chunks)
        return Router(*args, strict=False)
    return engine if fits else Router(*args, strict=False, second_order=second_order)
