"""The fast engine's recording forward: which modules own parameters, and what each was called with.

Outputs are recorded by their gradient edges (:class:`Call`), which in-place ops after the
module (``ReLU(inplace=True)``, a residual ``+=``) leave pointing at the module's own output.
``nn.MultiheadAttention`` run as self-attention and the recurrent layers are traced with their
forwards written out (:mod:`~noisy_label_sgd.engines.attention`,
:mod:`~noisy_label_sgd.engines.recurrent`), so that their affine maps (attention's in_proj and
out_proj; a recurrent layer's input and recurrent maps) become owners of their own whose output
gradients the model's own backward reaches.

Each recorded output's sample dim comes from a forward of one sample and of two
(:func:`one_sample_layout`, cached). An output that holds m rows per sample in one dim (m for one
sample, 2m for two: Swin's windows merged into the batch) is recorded unflattened there, [.., n,
m, ..] (:func:`sample_rows`): the samples then run along a dim of their own and the m rows are
positions; that the rows are in sample-major blocks is what the certificate's row check
certifies. An output shared by all samples ([1, ...], broadcast) is
traced expanded to the batch where that leaves the model's output unchanged; one that is the
same for one sample and for two ([q, k, heads]: T5's relative position bias) is followed to where
it meets the samples (:mod:`~noisy_label_sgd.engines.shared`).

Whole-model refusals (:class:`FastPathUnsupported`): a module with parameters that is never
called (its weight used by a parent's functional code), a module returning a non-tensor, an
output with no single sample dim, or a shared value met by an operation without a rule.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from .attention import self_attention_forward
from .functional import Batch, OwnForward, forward_replacements, per_sample_outputs
from .ops import OpCall, OpRecorder, Watch
from .recurrent import is_stock_recurrent, unrolled_forward
from .shared import SharedUse, SharedValues, Verdict, survey
from .torch_internals import EDGES_OWNED


class FastPathUnsupported(RuntimeError):
    """The model needs the whole-model torch.func path (the message says why)."""


class NoSecondOrder(FastPathUnsupported):
    """grad reg's double backward is out of reach (a per-module fallback, a tie without a
    differentiable cross term); the norms are not."""


@dataclass
class Call:
    """One recorded call: its arguments, and where its output enters the autograd graph.

    Only the output's gradient edge is kept, not the tensor: the record holds no extra copy,
    and an in-place op after the module (``ReLU(inplace=True)``, a residual ``+=``) moves the
    tensor to a new node while the edge still leads to the module's own output.
    """

    args: tuple
    kwargs: dict
    edge: torch.autograd.graph.GradientEdge | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    # the module returned more than this output (a tuple with other tensors in it)
    several_outputs: bool = False
    # the dim of the output along which the samples run (1 for a sequence-first layer)
    sample_dim: int = 0
    # rows per sample in that dim of the module's own output and input (Swin's windows merged
    # into the batch: m > 1), recorded unflattened: ``shape`` and ``edge`` are [.., n, m, ..]'s
    rows: int = 1
    # what every output direction reuses: the input's per-sample squared norms (2-D inputs)
    memo: dict = field(default_factory=dict, repr=False)
    # the recognised operations that took the module's trainable parameters (each its own, all
    # of them), where the module was watched (:mod:`~noisy_label_sgd.engines.ops`)
    ops: list[OpCall] | None = None


@dataclass
class Owner:
    """A module that owns trainable parameters directly, and its recorded calls."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    calls: list[Call] = field(default_factory=list)
    # a module traced written out (nn.MultiheadAttention as plain self-attention, a recurrent
    # layer): every affine map it applied, as (label, names of its parameters, call)
    packed: list[tuple[str, tuple[str, ...], Call]] = field(default_factory=list)
    # one such affine map: calls[c].args[0] -> its c-th output (a recurrent map: one per step)
    affine: bool = False
    # set by closed_forms.bind after the trace: this owner's part of the squared norms from its
    # output gradients, and of K = J J^T (None: no closed form)
    closed_form: Callable[[torch.Tensor], torch.Tensor] | None = None
    gram: Callable[[torch.Tensor], torch.Tensor] | None = None
    # and what the certificate checks (:mod:`~noisy_label_sgd.engines.certificate`), from one
    # output gradient per call, bare [*y]: the gradient summed over samples that the formula's
    # per-sample gradients imply (name -> tensor), and for sample i the formula's squared norm
    # beside that of its own per-sample gradient
    contract: Callable[[list[torch.Tensor]], dict[str, torch.Tensor]] | None = None
    one_sample: Callable[[list[torch.Tensor], int], tuple[torch.Tensor, torch.Tensor]] | None = None
    # closed_form also takes one direction's gradient bare, [*y] (see ClosedForm.bare)
    bare: bool = False
    # an owner made of the one operation its module applied (:mod:`~noisy_label_sgd.engines.ops`):
    # the module-level owner it replaces (restored where its formula fails the certificate), and
    # the closed form of that operation
    original: Owner | None = None
    form: object | None = None
    # a bare parameter's elementwise use (:mod:`~noisy_label_sgd.engines.elementwise`)
    elementwise: object | None = None
    # an output shared by all samples, reached through where it meets them (its calls are those
    # meetings: :mod:`~noisy_label_sgd.engines.shared`)
    shared: SharedUse | None = None


def input_over_calls(owner: Owner) -> torch.Tensor:
    """An owner's (first positional) input, its calls stacked as positions after the samples (an
    affine map applied at several time steps)."""
    if len(owner.calls) == 1:
        return recorded_input(owner.calls[0])
    return torch.stack([c.args[0] for c in owner.calls], 1)


def recorded_input(call: Call):
    """A call's first positional input, as its output is recorded: where that holds m rows per
    sample, unflattened alike, [.., n, m, ..] (an input whose leading dims are not the output's
    has no such reading)."""
    a = call.args[0]
    if call.rows == 1:
        return a
    d = call.sample_dim
    if not isinstance(a, torch.Tensor) or a.dim() + 1 != len(call.shape) or a.shape[d] != call.shape[d] * call.rows:
        raise FastPathUnsupported("an input whose rows per sample do not lead as its output's do")
    return a.unflatten(d, (call.shape[d], call.rows))


def grads_over_calls(grads: list[torch.Tensor]) -> torch.Tensor:
    """Output gradients [c, *y.shape] per call, stacked as positions like :func:`input_over_calls`."""
    return grads[0] if len(grads) == 1 else torch.stack(grads, 2)


def owners_of(model: nn.Module) -> list[Owner]:
    """The modules owning trainable parameters, in module order (no calls recorded yet); a
    parameter shared by two modules (tied weights) is in both (:mod:`~noisy_label_sgd.engines.ties`)."""
    owners = []
    for name, module in model.named_modules():
        params = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
        if params:
            owners.append(Owner(name or type(module).__name__, module, params))
    return owners


def gradient_edge(t: torch.Tensor) -> torch.autograd.graph.GradientEdge:
    """``torch.autograd.graph.get_gradient_edge(t)``, without its operation for the output of a
    Python Function (the written-out layers'): that makes a view to own the node; the tensor
    itself keeps it alive as well. (Where GradientEdge has no ownership token, an older torch: its own.)"""
    if t.grad_fn is None or not EDGES_OWNED:
        return torch.autograd.graph.get_gradient_edge(t)
    return torch.autograd.graph.GradientEdge(t.grad_fn, t.output_nr, ownership_token=t)


def graph_nodes(h: torch.Tensor) -> list:
    """The nodes of h's autograd graph, in the order a walk from h finds them (host time only)."""
    seen, order, stack = set(), [], [h.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return order


def record(owners: list[Owner], model: nn.Module, batch: Batch, expand: frozenset[str] = frozenset(),
           watched: frozenset[str] = frozenset(), shared: SharedValues | None = None,
           roots: frozenset[str] = frozenset(), blocks: dict[str, dict[int, tuple[int, int]]] | None = None,
           op_blocks: dict[str, dict[int, dict[int, tuple[int, int]]]] | None = None) -> torch.Tensor:
    """The model's forward with a hook on every owner that records its calls, and the operations
    that take the parameters of the owners named in ``watched`` (:class:`~.ops.OpRecorder`); the
    outputs of the owners named in ``roots`` (shared by all samples) followed by ``shared``.

    The owners named in ``expand`` return an output shared by all samples ([1, ...], broadcast
    by what follows): expanded to the batch (and their inputs with it), so that the backward
    reaches one copy per sample and their gradients are per sample. ``blocks``: per owner and
    call, the dim and rows per sample m of an output holding m rows per sample in one dim,
    recorded unflattened there (:func:`sample_rows`); ``op_blocks`` the same per owner, call and
    recorded operation.
    """
    n = batch[0].shape[0]
    recorder = OpRecorder(gradient_edge, shared, roots)

    def make_watch(owner: Owner | None):
        # its own parameters, and those of the modules inside it, which its own code may apply
        # (a child never called: torchvision's Swin attention applies its qkv's weight); while
        # such a module runs (``None``: not watched itself) the operations are that module's
        params = {} if owner is None else {id(p): p for p in owner.module.parameters() if p.requires_grad}
        names = {} if owner is None else {id(p): name for name, p in owner.module.named_parameters()}
        constants = set() if owner is None else {id(b) for b in owner.module.buffers()}

        def watch(module, args) -> None:  # (the module's calls nest: a stack)
            if owner is None:
                recorder.running.append((params, Watch()))
                return
            blocked = (op_blocks or {}).get(owner.name, {}).get(len(owner.calls), {})
            recorder.running.append((params, Watch(blocks=blocked, n=n, constants=set(constants), names=names,
                                                   owner=owner.name)))

        return watch

    def make_hook(owner: Owner):
        def hook(module, args, kwargs, output):
            call, replaced = record_call(module, args, kwargs, output)
            if owner.name in watched:
                call.ops = recorder.running.pop()[1].partition(owner.params)
            elif owner.name in inside_watched:
                recorder.running.pop()
            if owner.name in roots and shared is not None and isinstance(output, torch.Tensor):
                shared.add_root(output, owner.name)
            return replaced

        def record_call(module, args, kwargs, output) -> tuple[Call, torch.Tensor | None]:
            """The call recorded, and the output that replaces the module's (None: its own)."""
            if owner.name in expand and isinstance(output, torch.Tensor) and output.dim() and output.shape[0] == 1:
                output = output.expand(n, *output.shape[1:])
                args = tuple(t.expand(n, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1
                             else t for t in args)
                owner.calls.append(Call(args, kwargs, _call_of(args, output).edge, output.shape, output.dtype,
                                        output.device))
                return owner.calls[-1], output
            module_output = output
            several = isinstance(output, tuple) and any(t is not None for t in output[1:])
            # a tuple whose other entries are None (nn.MultiheadAttention, need_weights=False),
            # or a module traced written out (its affine maps are what the closed forms see)
            if isinstance(output, tuple) and output and (not several or owner.packed):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise FastPathUnsupported(f"module {owner.name!r} returns {type(output).__name__}")
            edge = None  # (a forward under no_grad only measures sizes)
            block = (blocks or {}).get(owner.name, {}).get(len(owner.calls))
            replaced, rows, shape = None, 1, output.shape
            if torch.is_grad_enabled():
                if output.grad_fn is None:
                    raise FastPathUnsupported(f"the output of module {owner.name!r} is not differentiable")
                recorded = output
                if block is not None:  # the samples in a dim of their own: the m rows are positions
                    d, rows = block
                    if output.dim() <= d or output.shape[d] != n * rows:
                        raise FastPathUnsupported(f"module {owner.name!r} holds {rows} rows per sample for one "
                                                  f"sample but not for {n}")
                    recorded = output.unflatten(d, (n, rows))
                    replaced, shape = recorded.flatten(d, d + 1), recorded.shape
                    if isinstance(module_output, tuple):
                        replaced = (replaced, *module_output[1:])
                edge = gradient_edge(recorded)
            owner.calls.append(Call(args, kwargs, edge, shape, output.dtype, output.device, several, rows=rows))
            return owner.calls[-1], replaced

        return hook

    # first among the module's forward hooks: what the module's own forward returned (a user's
    # hook that changes the output is then an op of the graph after it)
    handles = [o.module.register_forward_hook(make_hook(o), with_kwargs=True, prepend=True) for o in owners]
    handles += [o.module.register_forward_pre_hook(make_watch(o), prepend=True) for o in owners if o.name in watched]
    inside = {id(m) for o in owners if o.name in watched for m in o.module.modules() if m is not o.module}
    inside_watched = frozenset(o.name for o in owners if o.name not in watched and id(o.module) in inside)
    handles += [o.module.register_forward_pre_hook(make_watch(None), prepend=True) for o in owners
                if o.name in inside_watched]
    written_out = {}  # owner -> the instance forward it had before (None: the class's)
    for o in owners:
        own = vars(o.module).get("forward")
        if isinstance(o.module, nn.MultiheadAttention) and own is None:
            written_out[id(o)] = (o, own)
            o.module.forward = self_attention_forward(o.module, record=_packer(o))
        elif is_stock_recurrent(o.module) and (own is None or getattr(own, "unrolled", False)):
            written_out[id(o)] = (o, own)
            o.module.forward = unrolled_forward(o.module, record=_packer(o))
    try:
        with forward_replacements(), recorder if watched else nullcontext(), shared if shared is not None else nullcontext():
            out = model(*batch)
    finally:
        for h in handles:
            h.remove()
        for o, own in written_out.values():
            if own is None:
                del o.module.forward
            else:
                o.module.forward = own
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor of predictions, got {type(out).__name__}")
    return out


def _call_of(inputs: torch.Tensor | tuple, output: torch.Tensor) -> Call:
    edge = torch.autograd.graph.get_gradient_edge(output) if output.requires_grad else None
    return Call(inputs if isinstance(inputs, tuple) else (inputs,), {}, edge, output.shape, output.dtype,
                output.device)


def _packer(owner: Owner):
    """What a written-out forward calls for every affine map it applies."""
    return lambda label, names, inputs, output: owner.packed.append((label, names, _call_of(inputs, output)))


def _split_packed(owners: list[Owner]) -> list[Owner]:
    """A module called once and traced written out becomes its affine maps (a map applied at
    several time steps: one owner with a call per step)."""
    split = []
    for o in owners:
        maps: dict[str, tuple[tuple[str, ...], list[Call]]] = {}
        for label, names, call in o.packed:
            maps.setdefault(label, (names, []))[1].append(call)
        covered = {name for names, _ in maps.values() for name in names}
        if not (len(o.calls) == 1 and maps and set(o.params) <= covered):
            if any(c.several_outputs for c in o.calls):  # (its fallback would see the first only)
                raise FastPathUnsupported(f"module {o.name!r} returns several outputs")
            split.append(o)
            continue
        for label, (names, calls) in maps.items():
            params = {n: o.params[n] for n in names if n in o.params}
            if params:
                split.append(Owner(f"{o.name}.{label}", o.module, params, calls, affine=True))
    return split


def _merge_uncalled(owners: list[Owner]) -> list[Owner]:
    """Give the parameters of a never-called module to its called parent (the parent's own
    code uses them, e.g. MultiheadAttention's out_proj), for the parent's per-module fallback;
    drop one whose parameters are all tied to called modules (T5's ``shared`` embedding, whose
    weight its encoder's ``embed_tokens`` looks up: their calls are its uses)."""
    by_name = {o.name: o for o in owners}
    called = {id(p) for o in owners if o.calls for p in o.params.values()}
    kept = []
    for o in owners:
        if o.calls:
            kept.append(o)
            continue
        if all(id(p) in called for p in o.params.values()):  # (tied to called modules: their calls use them)
            continue
        parent_name, _, child = o.name.rpartition(".")
        parent = by_name.get(parent_name)
        if parent is None or not parent.calls:
            raise FastPathUnsupported(f"the parameters of {o.name!r} are used without calling it")
        parent.params.update({f"{child}.{n}": p for n, p in o.params.items()})
    return kept


def trace(model: nn.Module, batch: Batch) -> tuple[list[Owner], torch.Tensor]:
    """Forward with recording hooks: the owners with their calls, and the outputs h [n, k]
    (with their graph).

    Raises:
        FastPathUnsupported: a module output whose samples run along no single dim (an output
            shared by all samples and broadcast, or a call count that depends on the batch).
    """
    layout = one_sample_layout(model, batch)
    owners = owners_of(model)
    shared = SharedValues(layout.verdicts, batch[0].shape[0], gradient_edge, layout.parameter_roots) \
        if layout.roots else None
    with torch.enable_grad():
        h = per_sample_outputs(record(owners, model, batch, layout.expanded, layout.watched, shared, layout.roots,
                                      layout.blocks, layout.op_blocks), batch)
    owners = _split_packed(_merge_uncalled(owners))
    if shared is not None:
        _reached_through_meetings(owners, shared, layout.replayable)
    set_sample_dims(owners, layout.sample_dims, layout.op_sample_dims)
    return owners, h


def _reached_through_meetings(owners: list[Owner], shared: SharedValues, replayable: frozenset[str]) -> None:
    """The owners whose output all samples share get their meetings with the samples as calls
    (:mod:`~noisy_label_sgd.engines.shared`), and those in ``replayable`` their own forward
    replayed per sample."""
    if shared.failed is not None:
        raise FastPathUnsupported(shared.failed)
    for o in owners:  # (a parameter-only function's result: its operation's owner, made later, meets them)
        for op in (op for c in o.calls for op in c.ops or () if op.kind == "shared" and op.root in shared.roots):
            met = [m for m in shared.meetings if op.root in m.roots]
            if not met or any(m.edge is None for m in met) or op.root in shared.unmet:
                continue  # (none: its module falls back)
            op.meetings, op.output = met, shared.outputs[op.root]
            if op.root not in replayable:
                op.replay = None
    for o in owners:
        if o.name not in shared.roots:
            continue
        met = [m for m in shared.meetings if o.name in m.roots]
        if not met or any(m.edge is None for m in met):
            raise FastPathUnsupported(f"the output of module {o.name!r} is shared by all samples and never meets "
                                      "them differentiably")
        root_call = o.calls[0]
        o.calls = [Call((m.operand,), {}, m.edge, m.shape, m.operand.dtype, m.operand.device, sample_dim=m.sample_dim)
                   for m in met]
        replay = _replay(o.module, root_call) if o.name in replayable else None
        o.shared = SharedUse(o.params, [m.operand for m in met], [m.sample_dim for m in met], shared.outputs[o.name],
                             replay)


def _replay(module: nn.Module, call: Call) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The module's own forward (hooks not run: the trace records what it returns) at its
    recorded call, as a function of its parameters."""
    args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in call.args)
    kwargs = {key: t.detach() if isinstance(t, torch.Tensor) else t for key, t in call.kwargs.items()}

    def replay(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with forward_replacements():
            out = functional_call(OwnForward(module), {f"module.{k}": v for k, v in params.items()}, args, kwargs)
        return out[0] if isinstance(out, tuple) else out

    return replay


def _replays_operation(op: OpCall) -> bool:
    """Whether a parameter-only function runs under vmap on its parameter batched (twice)."""
    weight = op.params["weight"].detach()
    return _runs_batched(op.replay, weight.expand(2, *weight.shape), op.shape)


def _replays(owner: Owner) -> bool:
    """Whether the owner's own forward at its call runs under vmap, on its parameters batched
    (twice), and returns its output for each: decided once, on the sizing forward."""
    batched = {name: p.detach().expand(2, *p.shape) for name, p in owner.params.items()}
    return _runs_batched(_replay(owner.module, owner.calls[0]), batched, owner.calls[0].shape)


def _runs_batched(replay, batched, shape: torch.Size) -> bool:
    """Whether ``replay`` runs under vmap on ``batched`` (two of each) and returns a result of
    ``shape`` for each."""
    try:
        with torch.no_grad():
            out = vmap(replay)(batched)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # (an operation without a batching rule, a read of a batched value)
        return False
    return isinstance(out, torch.Tensor) and out.shape == (2, *shape)


def watched_owners(owners: list[Owner]) -> frozenset[str]:
    """The owners whose class has no closed form that applies (or is not what their forward
    computes): the trace records the operations that take their parameters."""
    from .closed_forms import closed_form_of  # (the closed forms read the trace's records)

    return frozenset(o.name for o in owners if closed_form_of(o.module) is None
                     and not isinstance(o.module, nn.MultiheadAttention) and not is_stock_recurrent(o.module))


def set_sample_dims(owners: list[Owner], sample_dims: dict[str, list[int | None]],
                    op_sample_dims: dict[str, list[list[int | None] | None]] | None = None, strict: bool = True) -> None:
    """Where the samples run in every recorded output (``Call.sample_dim``, and its operation's,
    ``OpCall.sample_dim``; the written-out maps' are samples-first by construction): a closed
    form that treats leading dims as positions takes any dim, the others only dim 0."""
    for o in owners:
        if o.affine or o.shared is not None:  # (their own dims, set as they were made)
            continue
        for call, dims in zip(o.calls, (op_sample_dims or {}).get(o.name, [])):
            for op, d in zip(call.ops or (), dims or ()):
                op.sample_dim = d
        if not strict:  # (the operations' alone: a sizing forward's owners)
            continue
        dims = sample_dims.get(o.name, [])
        if len(dims) != len(o.calls):
            raise FastPathUnsupported(f"module {o.name!r} is called {len(o.calls)} times for this batch but "
                                      f"{len(dims)} times for one sample")
        for call, d in zip(o.calls, dims):
            if d is None:
                raise FastPathUnsupported(f"the output of module {o.name!r} has no single sample dim (one "
                                          "output shared by all samples, or several rows per sample in one dim)")
            call.sample_dim = d


@dataclass
class Layout:
    """What a one-sample forward shows, per model and per-sample input signature."""

    k: int  # outputs per sample
    floats: int  # recorded layer outputs per sample (their sum of sizes)
    itemsize: int
    outside: list[str]  # owners whose parameters are also used outside their call
    # per owner and call, the dim of its output along which the samples run (None: none)
    sample_dims: dict[str, list[int | None]]
    # per owner, the calls whose output holds several rows per sample in that dim: call index ->
    # (dim, rows per sample), recorded unflattened (:func:`sample_rows`)
    blocks: dict[str, dict[int, tuple[int, int]]]
    # owners whose output is shared by all samples, traced expanded to the batch (see record)
    expanded: frozenset[str]
    # owners whose operations the trace records (:func:`watched_owners`), and per call the
    # sample dims of the recorded operations' outputs (None: no operations)
    watched: frozenset[str]
    op_sample_dims: dict[str, list[list[int | None] | None]]
    # per watched owner, call and operation: the dim and rows per sample of an operation's output
    # that holds several there (recorded unflattened)
    op_blocks: dict[str, dict[int, dict[int, tuple[int, int]]]]
    # every owner has a closed form, its class's or its operations' (none falls back)
    covered: bool
    # owners whose output all samples share (no sample dim, the same for one sample and two),
    # followed to where they meet the samples, and the verdicts on the operations on them
    # (:mod:`~noisy_label_sgd.engines.shared`)
    roots: frozenset[str] = frozenset()
    verdicts: tuple[Verdict, ...] = ()
    # of those, the results of functions of a watched module's parameter and constants alone
    # (:class:`~noisy_label_sgd.engines.ops.OpCall` of kind "shared"), named "module.parameter"
    parameter_roots: frozenset[str] = frozenset()
    # the roots whose own forward runs under vmap, on parameters batched per sample (their
    # per-sample gradients by one backward of it: :class:`~noisy_label_sgd.engines.shared.SharedUse`)
    replayable: frozenset[str] = frozenset()


# The one-sample forward per model and per-sample input signature: a probe calls with the same
# model and shapes every time, and for a small model that forward is a sixth of the norms'
# time. A model changed in place behind an unchanged signature could only mis-size the chunks.
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def one_sample_layout(model: nn.Module, batch: Batch) -> Layout:
    """:class:`Layout` from forwards without gradients (cached) of the first sample, which also
    watches where parameters are used (:class:`ParameterUses`), and of that sample twice: a
    recorded output's sample dim is the one dim in which the two differ."""
    signature = (tuple((t.shape[1:], t.dtype, t.device) for t in batch),
                 tuple((p.shape, p.requires_grad) for p in model.parameters()))
    layouts = _LAYOUTS.setdefault(model, {})
    if signature not in layouts:
        owners, twice = owners_of(model), owners_of(model)
        watched = watched_owners(owners)
        two = tuple(t[:1].expand(2, *t.shape[1:]) for t in batch)
        with torch.no_grad():
            with ParameterUses(model, owners) as uses:
                out = record(owners, model, tuple(t[:1] for t in batch), watched=watched)
            out_twice = record(twice, model, two, watched=watched)
        outside = sorted(name for name in uses.outside if any(o.name == name and o.calls for o in owners))
        floats = sum(c.shape.numel() for o in owners for c in [*o.calls, *(call for _, _, call in o.packed)])
        # per owner called as often for one sample as for two, per call (and per operation of
        # the watched ones): where the samples run in its output, and how many rows each holds there
        same = [(o, t) for o, t in zip(owners, twice) if len(o.calls) == len(t.calls)]
        call_rows = {o.name: [sample_rows(one.shape, two.shape) for one, two in zip(o.calls, t.calls)] for o, t in same}
        op_rows = {o.name: [[sample_rows(a.shape, b.shape) for a, b in zip(one.ops, two.ops)]
                            if one.ops and two.ops and len(one.ops) == len(two.ops) else None
                            for one, two in zip(o.calls, t.calls)] for o, t in same if o.name in watched}
        sample_dims = {name: _dims(rows) for name, rows in call_rows.items()}
        blocks = {name: several for name, rows in call_rows.items() if (several := _several_rows(rows))}
        op_sample_dims = {name: [None if ops is None else _dims(ops) for ops in calls] for name, calls in op_rows.items()}
        op_blocks = {name: several for name, calls in op_rows.items()
                     if (several := {i: b for i, ops in enumerate(calls) if ops and (b := _several_rows(ops))})}
        shared = frozenset(o.name for o in owners if o.name in sample_dims and any(
            d is None and c.shape[0] == 1 for d, c in zip(sample_dims[o.name], o.calls)))
        expanded = frozenset()
        if shared and _same_when_expanded(model, two, shared, out_twice):
            expanded = shared
            sample_dims = {name: [0 if name in shared and d is None else d for d in dims]
                           for name, dims in sample_dims.items()}
        roots = frozenset(o.name for o, t in zip(owners, twice) if sample_dims.get(o.name) == [None]
                          and o.name not in expanded and o.calls[0].shape == t.calls[0].shape)
        # (and the results of functions of a watched module's parameter and constants alone)
        parameter_roots = {op.root: op for o in owners for c in o.calls for op in c.ops or () if op.kind == "shared"}
        roots |= frozenset(parameter_roots)
        verdicts: tuple[Verdict, ...] = ()
        replayable: frozenset[str] = frozenset()
        while roots:
            surveyed = _surveyed(model, tuple(t[:1] for t in batch), two, roots, watched)
            # (a parameter's function that does not meet the samples by a rule: its module falls
            # back, and the others are surveyed again without it)
            dropped = frozenset(parameter_roots) & (roots if isinstance(surveyed, str) else surveyed[2])
            if dropped and roots - dropped:
                roots, parameter_roots = roots - dropped, {r: op for r, op in parameter_roots.items() if r not in dropped}
                continue
            if isinstance(surveyed, str) or dropped:  # (the trace refuses them: no sample dim, or no rule)
                roots, parameter_roots = frozenset(), {}
                break
            verdicts, met, _ = surveyed
            floats += met
            replayable = frozenset([o.name for o in owners if o.name in roots and _replays(o)] + [
                name for name, op in parameter_roots.items() if _replays_operation(op)])
            break
        from .closed_forms import covered  # (the closed forms read the trace's records)

        try:
            sized = _split_packed(_merge_uncalled(owners))
            set_sample_dims(sized, {}, op_sample_dims, strict=False)
            all_covered = covered([o for o in sized if o.name not in roots], frozenset(parameter_roots))
        except FastPathUnsupported:
            all_covered = False
        layouts[signature] = Layout(out.numel(), floats, out.element_size(), outside, sample_dims, blocks, expanded,
                                    watched, op_sample_dims, op_blocks, all_covered, roots, verdicts,
                                    roots & frozenset(parameter_roots), replayable)
    return layouts[signature]


def _surveyed(model: nn.Module, one: Batch, two: Batch, roots: frozenset[str], watched: frozenset[str]
              ) -> tuple[tuple[Verdict, ...], int, frozenset[str]] | str:
    """:func:`~noisy_label_sgd.engines.shared.survey` of the forwards of one sample and of two."""
    surveys = (SharedValues(), SharedValues())
    with torch.enable_grad():  # (as the trace runs: a forward may take another path without grad)
        for batch, shared in zip((one, two), surveys):
            record(owners_of(model), model, batch, watched=watched, shared=shared, roots=roots)
    return survey(*surveys)


def _same_when_expanded(model: nn.Module, two: Batch, shared: frozenset[str], out_twice: torch.Tensor) -> bool:
    """Whether the model's outputs stay the same with the outputs of ``shared`` expanded to the
    batch (nothing reduces over their dim 0). A model whose own ops refuse the expanded shapes (a
    RuntimeError from inside its forward: Swin's attention with its relative position bias) does
    not take them."""
    try:
        with torch.no_grad():
            return torch.equal(record(owners_of(model), model, two, shared), out_twice)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        return False


def _dims(rows: list[tuple[int, int] | None]) -> list[int | None]:
    return [None if r is None else r[0] for r in rows]


def _several_rows(rows: list[tuple[int, int] | None]) -> dict[int, tuple[int, int]]:
    """Of :func:`sample_rows` per call (or operation), those with several rows per sample: by index."""
    return {i: r for i, r in enumerate(rows) if r is not None and r[1] > 1}


def sample_rows(one: torch.Size, two: torch.Size) -> tuple[int, int] | None:
    """The one dim in which an output for one sample and for two differ, from m to 2m, and m:
    the samples' dim, m = 1; or m > 1 rows per sample there (Swin's windows merged into the
    batch, [n windows, ...]), read as sample-major blocks, which the certificate's row check
    holds every measurement to (rows interleaved by sample fail it). None otherwise."""
    differ = [d for d, (a, b) in enumerate(zip(one, two)) if a != b]
    if len(one) != len(two) or len(differ) != 1 or two[differ[0]] != 2 * one[differ[0]]:
        return None
    return differ[0], one[differ[0]]


def fast_chunk_size(model: nn.Module, batch: Batch, memory_budget: int) -> tuple[int, int]:
    """Samples per chunk so that what the fast path holds fits ``memory_budget`` bytes, and the
    outputs per sample k.

    Per sample it holds every recorded layer input and output (in the graph) and at most k
    output gradients of each (fewer when the directions go in groups): measured on the
    one-sample forward (:func:`one_sample_layout`), times (k + 2).

    Raises:
        FastPathUnsupported: a called module's parameter is also used outside its call.
    """
    layout = one_sample_layout(model, batch)
    if layout.outside:
        raise FastPathUnsupported(
            f"the parameters of {layout.outside[0]!r} are also used outside its call (e.g. a parent's forward "
            "reading its weight): the closed forms would miss that use"
        )
    return max(1, memory_budget // max(1, layout.itemsize * layout.floats * (layout.k + 2))), layout.k


class ParameterUses(TorchFunctionMode):
    """Which owners' trainable parameters a forward uses while that owner is not running.

    A module's closed form sees only what flows through its own call; a parameter that also
    enters the output elsewhere (a parent's ``z @ self.emb.weight`` after ``self.emb(x)``) would
    make every norm silently wrong. Watched once per model and input signature, on the sizing
    forward.
    """

    def __init__(self, model: nn.Module, owners: list[Owner]) -> None:
        super().__init__()
        self.owners_of: dict[int, set[str]] = {}  # (a tied parameter has two)
        for o in owners:
            for p in o.params.values():
                self.owners_of.setdefault(id(p), set()).add(o.name)
        self.name_of = {id(o.module): o.name for o in owners}
        self.running: list[str] = []
        self.outside: set[str] = set()
        self.modules = list(model.modules())

    def __enter__(self):
        ids = {id(m) for m in self.modules}

        def enter(module, args) -> None:
            if id(module) in ids:
                self.running.append(self.name_of.get(id(module), ""))

        def leave(module, args, output) -> None:  # (returns None: the output stays as it is)
            if id(module) in ids:
                self.running.pop()

        self._handles = [nn.modules.module.register_module_forward_pre_hook(enter),
                         nn.modules.module.register_module_forward_hook(leave, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # metadata (.shape, .size(), .dtype) does not enter the output: only a tensor result can
        if isinstance(result, torch.Tensor) or (isinstance(result, (list, tuple)) and any(
                isinstance(r, torch.Tensor) for r in result)):
            for t in (*args, *kwargs.values()):
                for tensor in (t if isinstance(t, (list, tuple)) else (t,)):
                    names = self.owners_of.get(id(tensor), ())
                    if names and not names.intersection(self.running):
                        self.outside.update(names)
        return result
