"""The model as a pure function of its trainable parameters, and the probe set it is measured on.

Every engine evaluates the model in :func:`evaluation_mode` (dropout off, BatchNorm on running
statistics, so samples are independent; no random state touched) and reads the parameters
through a :class:`FunctionalModel`: trainable parameters (``requires_grad=True``) in
``named_parameters()`` order are the variables, frozen parameters and buffers are constants.
"""

from __future__ import annotations

import functools
import sys
import types
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..arguments import check_positive_int
from ..distributed import check_unsharded
from . import convolution
from .activations import gelu, new_gelu_forward, relu
from .group_norm import group_norm, layer_norm
from .recurrent import unrolled_recurrences
from .untouched import kept_as_found

Inputs = torch.Tensor | Sequence[torch.Tensor]
ParamDict = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, ...]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes held at once on the CPU (per-sample Jacobians, layer gradients)


def as_input_tuple(inputs: Inputs) -> Batch:
    """Inputs as a tuple of tensors sharing a non-empty first (sample) dimension (inference
    tensors copied to ordinary ones: a backward cannot save an inference tensor)."""
    batch = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not batch or not all(isinstance(t, torch.Tensor) for t in batch):
        raise TypeError("inputs must be a tensor or a sequence of tensors (the model's arguments)")
    if any(t.dim() == 0 for t in batch):
        raise ValueError("inputs need a leading sample dimension, got a 0-dim tensor")
    n = batch[0].shape[0]
    if any(t.shape[0] != n for t in batch):
        raise ValueError(f"inputs disagree in their sample dimension: {[t.shape[0] for t in batch]}")
    if n == 0:
        raise ValueError("the probe set is empty (0 samples)")
    if any(t.is_inference() for t in batch):
        with torch.inference_mode(False):
            batch = tuple(t.clone() if t.is_inference() else t for t in batch)
    return batch


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and torch.compile wrappers, in any nesting: its
    parameters are the same tensors, and it can be differentiated twice (a compiled backward
    with donated buffers refuses ``create_graph``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


def check_chunk_size(chunk_size: int | None) -> int | None:
    return check_positive_int("chunk_size", chunk_size)


def check_memory_budget(memory_budget: int | None) -> int | None:
    """Bytes, a positive int (None: :func:`default_memory_budget`)."""
    return check_positive_int("memory_budget", memory_budget)


class FunctionalModel:
    """A module as a pure function of its trainable parameters (frozen ones and buffers fixed)."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        inference = [name for name, p in model.named_parameters() if p.is_inference()]
        if inference:
            raise ValueError(
                f"parameters {inference[:3]} are inference tensors (made under torch.inference_mode), "
                "which cannot be differentiated; build the model outside inference mode"
            )
        # the live parameters; detached copies (``params``) only where torch.func needs them:
        # each detach is an operation a GPU pays for in host time (ResNet-18 has 62 parameters)
        self.trainable: ParamDict = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True): reg is defined "
                "over trainable parameters only"
            )
        check_unsharded(model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
                raise ValueError(
                    f"{type(module).__name__} without running statistics normalises with batch "
                    "statistics even in eval mode, so samples are not independent and "
                    "per-sample gradients are undefined; use track_running_stats=True or GroupNorm"
                )
        self.num_params = sum(p.numel() for p in self.trainable.values())
        first = next(iter(self.trainable.values()))
        self.dtype, self.device = first.dtype, first.device

    @functools.cached_property
    def params(self) -> ParamDict:
        """The trainable parameters detached, as torch.func's functions take them."""
        return {name: p.detach() for name, p in self.trainable.items()}

    @functools.cached_property
    def constants(self) -> ParamDict:
        """Frozen parameters and buffers, detached."""
        constants = {name: p.detach() for name, p in self.model.named_parameters() if not p.requires_grad}
        constants.update((name, b.detach()) for name, b in self.model.named_buffers())
        return constants

    def batch_output(self, params: ParamDict, batch: Batch) -> torch.Tensor:
        """Model outputs of a batch, flattened per sample: shape [b, k]."""
        with forward_replacements():
            out = functional_call(self.model, (params, self.constants), batch)
        return per_sample_outputs(out, batch)

    def live_output(self, batch: Batch) -> torch.Tensor:
        """batch_output at the module's own parameters, differentiable in them (with
        :meth:`live_params`): the same numbers, without functional_call's swap in and out."""
        with forward_replacements():
            out = self.model(*batch)
        return per_sample_outputs(out, batch)

    def live_params(self) -> list[torch.Tensor]:
        """The module's trainable parameters themselves, in the order of ``params``."""
        return list(self.trainable.values())

    def sample_output(self, params: ParamDict, *sample: torch.Tensor) -> torch.Tensor:
        """Output of one sample, shape [k] (vmapped over samples by the callers)."""
        return self.batch_output(params, tuple(s.unsqueeze(0) for s in sample))[0]

    def output_size(self, batch: Batch) -> int:
        with torch.no_grad():
            return self.batch_output(self.params, tuple(t[:1] for t in batch)).shape[1]

    def jacobian_rows(self, jac: ParamDict) -> torch.Tensor:
        """Per-sample Jacobians (name -> [b, k, *param.shape]) as rows of J: [b k, p]."""
        blocks = (jac[name] for name in self.trainable)
        return torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in blocks], dim=1)

    def flatten(self, tensors: ParamDict) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in self.trainable])

    def unflatten(self, flat: torch.Tensor) -> ParamDict:
        out, start = {}, 0
        for name, p in self.trainable.items():
            out[name] = flat[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return out

    def jacobian_fits(self, rows: int, memory_budget: int) -> bool:
        """Whether J [rows, p] takes at most ``memory_budget`` bytes."""
        return rows * self.num_params * torch.empty((), dtype=self.dtype).element_size() <= memory_budget

    def chunk_size(self, k: int, chunk_size: int | None, memory_budget: int, copies: int = 1) -> int:
        """Samples per chunk so that ``copies`` per-sample Jacobians of [k, p] fit the budget."""
        if chunk_size is not None:
            return chunk_size
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return max(1, memory_budget // max(1, copies * k * self.num_params * itemsize))

    def J_times(self, chunks: list[Batch], w: torch.Tensor) -> torch.Tensor:
        """J w: a jvp of the batched outputs per chunk (forward mode, J never formed)."""
        tangent = self.unflatten(w)
        return torch.cat(
            [jvp(lambda p: self.batch_output(p, c), (self.params,), (tangent,))[1].reshape(-1) for c in chunks]
        )

    def linear_products(self, batch: Batch) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                      Callable[[torch.Tensor], torch.Tensor]]:
        """v -> J v and u -> J^T u on one batch at the current parameters, for many products (a
        solver's iterations) from one forward: J^T u by the vjp's graph, J v by the vjp of that
        pullback (u -> J^T u is linear, so its own vjp at any u is v -> J v), both graphs held
        until the functions are dropped. A product is then a backward, or a backward through the
        backward, never the forward again (a jvp each recomputes it with its tangent)."""
        out, pullback = vjp(lambda p: self.batch_output(p, batch), self.params)
        transpose = lambda u: pullback(u.view_as(out))[0]  # noqa: E731
        _, pushforward = vjp(transpose, torch.zeros_like(out))
        return (lambda v: pushforward(self.unflatten(v))[0].reshape(-1),
                lambda u: self.flatten(transpose(u)))

    def J_transpose_times(self, chunks: list[Batch], u: torch.Tensor) -> torch.Tensor:
        """J^T u: a vjp of the batched outputs per chunk."""
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        start = 0
        for c in chunks:
            out, pullback = vjp(lambda p: self.batch_output(p, c), self.params)
            total += self.flatten(pullback(u[start : start + out.numel()].view_as(out))[0])
            start += out.numel()
        return total


def per_sample_outputs(out, batch: Batch) -> torch.Tensor:
    """A model's output as [b, k], with the errors a wrong output deserves."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model must return a tensor of predictions, got {type(out).__name__}; wrap "
            "it in a module that returns the prediction tensor"
        )
    b = batch[0].shape[0]
    if out.dim() == 0 or out.shape[0] != b:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)}; expected a leading sample "
            f"dimension of size {b}"
        )
    return out.reshape(b, -1)


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """F.hardsigmoid as a composite: the same values in every dtype (computed in float32 below
    it, as the kernel does) and the same first derivative, and differentiable twice, forward and reverse, where
    the kernel's backward has no derivative at all (double backward and jvp both raise)."""
    wide = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    inside = (wide > -3) & (wide < 3)  # (the kernel's backward: slope 1/6 strictly inside)
    out = torch.where(inside, (wide + 3) / 6, (wide >= 3).to(wide.dtype)).to(input.dtype)
    return input.copy_(out) if inplace else out


_REPLACEMENTS: ContextVar[dict] = ContextVar("forward_replacements", default={})


@contextmanager
def replaced_in_forwards(table: dict) -> Iterator[None]:
    """Torch functions replaced by equal ones (``{torch's: the engines'}``) in the model forwards
    that the engines run inside the block (:func:`forward_replacements`). Local to the thread and
    context: nothing in ``torch.nn.functional`` is rebound, so other threads, and the caller's own
    code inside the block, see torch's functions."""
    token = _REPLACEMENTS.set({**_REPLACEMENTS.get(), **table})
    try:
        yield
    finally:
        _REPLACEMENTS.reset(token)


class Replacing(TorchFunctionMode):
    """Every call of a function in ``table`` goes to its replacement (a mode sees the function a
    module calls, ``F.gelu`` or ``torch.conv2d`` alike; the replacement runs with this mode off)."""

    def __init__(self, table: dict) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.table.get(func, func)(*args, **(kwargs or {}))


def forward_replacements() -> AbstractContextManager:
    """Entered by the engines around each model forward: the replacements in effect
    (:func:`replaced_in_forwards`), as a mode for the forward only (a mode adds host time to every
    function it sees; nothing is entered where no replacement is in effect)."""
    table = _REPLACEMENTS.get()
    return Replacing(table) if table else nullcontext()


def twice_differentiable(model: nn.Module | None = None) -> AbstractContextManager:
    """Functions whose backward PyTorch cannot differentiate, replaced by equal composites in the
    engines' forwards (grad reg differentiates the model twice): ``F.hardsigmoid`` (MobileNetV3's
    squeeze-excitation), where ``model`` has an ``nn.Hardsigmoid`` (or always, without a model).
    Elsewhere nothing is replaced, so the forwards take no mode for it (a call of F.hardsigmoid
    in a model's own code then fails loudly in the double backward: PyTorch has no derivative
    for it)."""
    if model is not None and not any(isinstance(m, nn.Hardsigmoid) for m in model.modules()):
        return nullcontext()
    return replaced_in_forwards({nn.functional.hardsigmoid: _hardsigmoid})


@contextmanager
def lean_second_order(model: nn.Module) -> Iterator[None]:
    """Forwards whose second derivative costs less, for grad reg's double backward (the same
    numbers): ``F.group_norm`` with its second derivative written out, and ``F.layer_norm`` as one
    group over rows (:mod:`~noisy_label_sgd.engines.group_norm`: PyTorch differentiates their
    backward through dozens of operations, and that again through about 150); ``F.conv1d`` and
    ``F.conv2d`` differentiated twice by their own kernels
    (:mod:`~noisy_label_sgd.engines.convolution`: PyTorch's derivative of a strided layer's
    backward computes 16 output positions for a 3x3 kernel's 9); ``F.gelu`` (and Hugging Face's
    ``NewGELUActivation``, GPT-2's, written out in 8 operations, as its tanh kernel: the model's
    instances, for the duration) with its second derivative written out, and ``F.relu`` without
    the zeros of its second derivative (:mod:`~noisy_label_sgd.engines.activations`). With the
    closed forms' own lean backwards, ResNet-18's grad reg dispatched 5175 operations before, 1548
    so; GPT-2's 2935, 2114; the benchmark CNN's computed 3.22x a step's FLOPs, 2.83x so. On this
    CPU as fast or faster (``benchmarks/README.md``)."""
    F = nn.functional
    table = {F.group_norm: group_norm, F.layer_norm: layer_norm, F.gelu: gelu, F.relu: relu,
             F.conv1d: convolution.conv1d, F.conv2d: convolution.conv2d}
    activations = sys.modules.get("transformers.activations")  # (only where the user imported it)
    new_gelus = [] if activations is None or not hasattr(activations, "NewGELUActivation") else [
        m for m in model.modules() if isinstance(m, activations.NewGELUActivation) and "forward" not in vars(m)
        and type(m).forward is activations.NewGELUActivation.forward]
    for module in new_gelus:
        module.forward = types.MethodType(new_gelu_forward, module)
    try:
        with replaced_in_forwards(table):
            yield
    finally:
        for module in new_gelus:
            del module.forward


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on (whatever the caller's grad mode), the math attention kernel (it
    has double backward), no RNG side effects, and no fused fast path of
    nn.TransformerEncoderLayer / nn.MultiheadAttention: in eval mode in float32, with no input requiring grad (as under torch.func), they take a fused kernel that
    has no forward AD (a jvp through it raises) and no double backward; recurrent layers
    written out over time steps (:mod:`~noisy_label_sgd.engines.recurrent`: torch.func has no
    batching rule for the fused ones); hardsigmoid as a composite (:func:`twice_differentiable`);
    buffers and embedding tables that the forward writes left as found
    (:func:`~noisy_label_sgd.engines.untouched.kept_as_found`)."""
    modes = [(module, module.training) for module in model.modules()]
    cuda_devices = sorted(
        {t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"}
    )
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # the caller's torch.no_grad() or inference_mode() is for its own code: the
        # measurement differentiates (and returns tensors without a graph)
        with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), \
                torch.random.fork_rng(devices=cuda_devices), unrolled_recurrences(model), twice_differentiable(model), \
                kept_as_found(model):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training


def fused_attention() -> AbstractContextManager:
    """Every scaled-dot-product attention kernel allowed again inside :func:`evaluation_mode`."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH])


def launch_bound(device: torch.device) -> bool:
    """Whether every dispatched operation costs host time that the arithmetic does not hide (an
    accelerator: a kernel launch each), so that fewer, larger operations beat cache-sized pieces.
    The one place where the engines' choices depend on the device; benchmarks/cost.py counts the
    accelerator's choices on the CPU by patching it."""
    return device.type != "cpu"


def default_memory_budget(device: torch.device) -> int:
    """What a measurement may hold at once where the caller gives no ``memory_budget``: 1 GiB on
    the CPU; on an accelerator a quarter of the memory free for PyTorch now, at least 1 GiB
    (there every chunk of samples repeats every operation, each a launch paid in host time:
    ResNet-18 at batch 128 took two chunks under 1 GiB, twice the operations of one)."""
    if not launch_bound(device):
        return DEFAULT_MEMORY_BUDGET
    return max(DEFAULT_MEMORY_BUDGET, available_memory(device) // 4)


def available_memory(device: torch.device) -> int:
    """Bytes free for PyTorch on the device now: the driver's free memory and what PyTorch's
    caching allocator holds unused (0 where unknown)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def chunk_slices(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def chunks_of(batch: Batch, chunk_size: int) -> list[Batch]:
    """The batch in chunks of samples; itself where one chunk holds it (a slice of all samples
    is still a dispatched operation)."""
    n = batch[0].shape[0]
    return [batch] if chunk_size >= n else [tuple(t[s] for t in batch) for s in chunk_slices(n, chunk_size)]


def cat_or_one(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, except of one part: that part (a cat of one is still a copy and an operation)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class OwnForward(nn.Module):
    """A module's own ``forward``, without its hooks: the trace records the output of that (the
    hooks are ops of the graph after it)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module.forward(*args, **kwargs)
