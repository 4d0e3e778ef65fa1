r"""The "fast" engine: per-sample norms from layer inputs and output gradients, in closed form.

No per-sample gradient of a whole model is ever formed. A recording forward
(:mod:`~noisy_label_sgd.engines.trace`) keeps each parametrised module's input and the gradient
edge of its output; a backward of the outputs, one direction j at a time (the summed outputs for
k = 1) or batched over a group of directions (``is_grads_batched``), gives
:math:`g_{ij} = \partial h_{ij}/\partial y` at every module output :math:`y`, and each module's
part of :math:`\|J_i\|_F^2` comes from its closed form (:mod:`~noisy_label_sgd.engines.closed_forms`).
One direction at a time, each module's part is taken by a hook on its output's node as the
backward passes it (:func:`streamed_part`); otherwise from all output gradients held together
(:func:`held_part`). The directions go in groups sized to the parameters on the CPU, all in one
batched backward on an accelerator (:func:`direction_groups`: every group repeats every kernel
launch). A direction's gradients reach the closed forms that take them bare, without a leading
direction dim (``ClosedForm.bare``): every view is an operation the host pays for.

Chosen for ``method="fast"``, and by ``"auto"`` for a model whose every parametrised module has
a registered closed form (or is ``nn.MultiheadAttention`` or a recurrent layer). A module without one, and a module
called more than once (a reused weight: its per-sample gradient is the sum over the calls), falls
back, for that module only, to torch.func per-sample gradients of its own parameters (a vmapped
vjp of the module at its recorded input); the method is then named
"fast (per-module fallback: ...)". A parameter tied between two modules adds the cross terms of
its two uses (:mod:`~noisy_label_sgd.engines.ties`). Every traced forward is certified first
(:func:`traced`, :mod:`~noisy_label_sgd.engines.certificate`). Where the model needs the
whole-model path (:class:`~noisy_label_sgd.engines.trace.FastPathUnsupported`), this engine
raises; the router (:mod:`~noisy_label_sgd.engines.router`) turns to the vmap engine from then
on under ``"auto"`` and refuses under ``"fast"``.

grad reg differentiates the closed-form norms once more (double backward) when no module falls
back; otherwise it comes from the vmap engine. The Gram matrix K has closed forms for Linear
layers on 2-D inputs and LayerNorm/GroupNorm; for other models :meth:`FastEngine.gram` is None.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import closed_forms, functional
from .engine import Engine
from .functional import Batch, ParamDict, cat_or_one, chunks_of, fused_attention
from .per_sample import module_per_sample_grads, per_sample_direct, per_sample_gradient_blocks, per_sample_grads
from .ties import cross_terms, ties_of
from .certificate import certify
from .trace import (Call, FastPathUnsupported, NoSecondOrder, Owner, fast_chunk_size, grads_over_calls, graph_nodes,
                    trace)
from .torch_internals import functorch_transforms_active


class FastEngine(Engine):
    """Answers what its closed forms cover and raises
    :class:`~noisy_label_sgd.engines.trace.FastPathUnsupported` otherwise (:class:`NoSecondOrder`
    where only grad reg's double backward is out of reach); the router
    (:mod:`~noisy_label_sgd.engines.router`) sends those questions to the vmap engine."""

    method = "fast"  # with the modules that fell back, once the norms ran

    def __init__(self, *args, strict: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.strict = strict  # method "fast": a formula that fails its certificate raises

    def output_size(self) -> int:
        try:  # the fast path's sizing forward, which it needs anyway
            fitting, k = fast_chunk_size(self.model, self.batch, self.memory_budget)
        except FastPathUnsupported:
            return super().output_size()
        # the matrix-free products hold what the norms hold: sized alike (the per-sample Jacobian
        # rule made ResNet-18's CG run each product in 6 pieces of 24 samples)
        self.product_chunk_size = self.chunk_size or fitting
        return k

    def sq_norms(self) -> torch.Tensor:
        return self._chunked_norms()

    def grad(self) -> ParamDict:
        return self._double_backward()[1]

    def norms_and_grad(self) -> tuple[torch.Tensor, ParamDict]:
        """One pass: the double backward gives both."""
        norms, grad_reg = self._double_backward()
        self.method = "fast"
        return norms, grad_reg

    def traced(self, batch: Batch) -> tuple[list[Owner], torch.Tensor]:
        return traced(self.model, batch, self.fm.trainable, self.strict)

    def gram(self) -> torch.Tensor | None:
        owners, h = self.traced(self.batch)
        if not all(o.gram is not None for o in owners) or ties_of(owners):  # (a tie's cross terms: none)
            return None
        by_owner = grads_by_owner(owners, h, range(h.shape[1]), create_graph=False)
        try:
            # accumulated in float64: the solver decomposes K, which squares J's conditioning
            return sum(o.gram(by_owner[id(o)][0].double()) for o in owners).detach()
        except FastPathUnsupported:  # (a Linear on sequence inputs)
            return None

    def gram_by_layers(self) -> torch.Tensor | None:
        """K = sum over layers of G G^T in float64, G a layer's per-sample gradients [n k, p_layer]
        (:func:`~noisy_label_sgd.engines.per_sample.per_sample_gradient_blocks`: a convolution's
        in slices of output channels), at most a quarter of the memory budget at a time: the
        dense projection for a J too large to form (ResNet-18 at batch 128: 5.7 GB), one trace
        and one backward instead of LSQR's two products per iteration. For one output per sample
        each layer's blocks are taken as the backward passes it (:func:`streamed_part`), so the
        trace of the whole batch is what must fit; for several, all output gradients at once.
        A parameter tied between layers has its uses' per-sample gradients added before their
        product (the cross terms: (G_A + G_B)(G_A + G_B)^T). None where that does not fit or a
        layer's block cannot fit."""
        fitting, k = fast_chunk_size(self.model, self.batch, self.memory_budget)
        # (its sizing counts the trace and k + 1 copies of the output gradients)
        if (fitting * (k + 2) if k == 1 else fitting) < self.num_samples:
            return None
        owners, h = self.traced(self.batch)
        tied = {id(tie.parameter) for tie in ties_of(owners)}
        tied_sums: dict[int, torch.Tensor] = {}  # a tied parameter's per-sample gradients, its uses added
        n = h.shape[0]
        with_ties = {id(o): o for o in owners if any(id(p) in tied for p in o.params.values())}
        # (its blocks are held whole until every use is in: decided before the backward, by sizes)
        if any(n * k * sum(p.numel() for p in o.params.values()) * 8 > self.memory_budget // 4
               for o in with_ties.values()):
            return None
        K = torch.zeros(n * k, n * k, dtype=torch.float64, device=h.device)
        fits = True

        def take(o: Owner, grads: list[torch.Tensor]) -> None:
            nonlocal fits
            if k == 1:  # (streamed: bare)
                grads = [g.unsqueeze(0) for g in grads]
            if id(o) in with_ties:
                with sdpa_kernel(SDPBackend.MATH):
                    for name, g in per_sample_grads(o, grads, n).items():
                        block = g.detach().double().transpose(0, 1).reshape(n * k, -1)  # rows (i, j)
                        p = o.params[name]
                        if id(p) in tied:
                            tied_sums[id(p)] = block + tied_sums[id(p)] if id(p) in tied_sums else block
                        else:
                            K.addmm_(block, block.T)
                return None
            if o.gram is not None:
                try:
                    K.add_(o.gram(grads_over_calls(grads).double()).detach())
                    return None
                except FastPathUnsupported:  # (a Linear on sequence inputs: its blocks instead)
                    pass
            with sdpa_kernel(SDPBackend.MATH):  # (vmapped where a module's own vjp runs)
                for block in per_sample_gradient_blocks(o, grads, n, self.memory_budget // 4):
                    if block is None:
                        fits = False
                        return None
                    block = block.detach().double()
                    K.addmm_(block, block.T)
            return None

        if k == 1:
            direct = lambda o: bool(o.closed_form) and (o.gram is not None or per_sample_direct(o))
            if streamed_part(owners, h, 0, retain_graph=False, take=take, hookable=direct) is None:
                return None
        else:
            by_owner = grads_by_owner(owners, h, range(k), create_graph=False)
            for o in owners:
                take(o, by_owner.pop(id(o)))
        for block in tied_sums.values():
            K.addmm_(block, block.T)
        return K if fits else None

    def jacobian(self) -> torch.Tensor:
        """J from the traced forward (:meth:`_traced_jacobian`: no torch.func over the whole
        model, whose forward may not vmap)."""
        m = self.measurement
        if m.jacobian is None:
            m.jacobian = self._traced_jacobian()
        return m.jacobian

    def _traced_jacobian(self) -> torch.Tensor:
        """J [n k, p] per chunk of samples: one backward of every output direction to the
        recorded module outputs, then each owner's per-sample gradients (:func:`per_sample_grads`)
        as its columns."""
        fm = self.fm
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        fitting, k = fast_chunk_size(self.model, self.batch, self.memory_budget)
        rows = []
        for chunk in chunks_of(self.batch, self.chunk_size or fitting):
            owners, h = self.traced(chunk)
            n = h.shape[0]
            by_owner = grads_by_owner(owners, h, range(k), create_graph=False)
            blocks = {}
            for o in owners:
                with sdpa_kernel(SDPBackend.MATH):  # (vmapped where a module's own vjp runs)
                    grads = per_sample_grads(o, by_owner.pop(id(o)), n)
                for name, g in grads.items():  # (a tied parameter: the sum of its uses)
                    key = name_of[id(o.params[name])]
                    blocks[key] = g.detach() + blocks[key] if key in blocks else g.detach()
            rows.append(torch.cat([blocks[name].transpose(0, 1).reshape(n * k, -1) for name in fm.trainable], 1))
        return cat_or_one(rows)

    # -- the closed forms --------------------------------------------------------------------

    def _chunked_norms(self) -> torch.Tensor:
        """fast_sq_norms over chunks of samples (by default as many as fit memory_budget)."""
        fitting, k = fast_chunk_size(self.model, self.batch, self.memory_budget)
        parts, fell_back = [], set()
        # Norms alone need no double backward: scalar outputs may take the fused attention kernels
        # training uses (their backward has no batching rule, which several output directions at
        # once would need)
        with fused_attention() if k == 1 else nullcontext():
            for chunk in chunks_of(self.batch, self.chunk_size or fitting):
                norms, modules = fast_sq_norms(self, chunk)
                parts.append(norms)
                fell_back.update(modules)
        self.method = "fast" + (f" (per-module fallback: {', '.join(sorted(fell_back))})" if fell_back else "")
        return cat_or_one(parts)  # (computed without a graph)

    def _double_backward(self) -> tuple[torch.Tensor, ParamDict]:
        """Per-sample norms and grad reg from one pass: double backward through the closed forms,
        in the parameters' dtype under autocast too (a second derivative of a bfloat16 forward
        was 8.6% off float32 on a transformer; the norms alone stay in autocast's dtypes)."""
        device = self.batch[0].device
        with torch.autocast(device.type, enabled=False), functional.lean_second_order(self.model):
            return self._double_backward_in_own_dtype()

    def _double_backward_in_own_dtype(self) -> tuple[torch.Tensor, ParamDict]:
        named = self.fm.trainable
        total: ParamDict = {}  # (filled as gradients arrive: no zeros to add them to)
        parts = []
        # the double backward keeps about twice the first backward's tensors
        chunk_size = self.chunk_size or max(1, fast_chunk_size(self.model, self.batch, self.memory_budget)[0] // 2)
        for chunk in chunks_of(self.batch, chunk_size):
            norms, _ = fast_sq_norms(self, chunk, create_graph=True)
            # (norms that do not depend on the parameters: a linear model, whose grad reg is 0)
            # the mean over all samples: the seed scaled (one operation, not one per parameter)
            grads = torch.autograd.grad(norms.sum() * (1.0 / self.num_samples), list(named.values()),
                                        allow_unused=True) if norms.requires_grad else [None] * len(named)
            for name, g in zip(named, grads):  # (no graph: no detach needed)
                if g is not None:
                    total[name] = total[name] + g if name in total else g
            parts.append(norms.detach())
        return cat_or_one(parts), {name: total[name] if name in total else torch.zeros_like(p)
                                   for name, p in named.items()}


# -- the backward: output gradients at every recorded module output -----------------------


def output_grads(h: torch.Tensor, calls: list[Call], directions: range, create_graph: bool,
                 bare: bool = False) -> list[torch.Tensor | None]:
    """d h_ij / d y for every recorded output y and the output directions j in ``directions``,
    stacked over them: [len(directions), *y.shape] (``bare``, for one output per sample:
    [*y.shape]); None for an output h does not use."""
    n, k = h.shape
    edges = [c.edge for c in calls]
    if k == 1:
        grads = torch.autograd.grad(h.sum(), edges, retain_graph=create_graph, create_graph=create_graph,
                                    allow_unused=True)
        if not bare:
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
    else:
        rows = torch.eye(k, dtype=h.dtype, device=h.device)[directions.start:directions.stop, None, :]
        rows = rows.expand(len(directions), n, k)
        try:
            if len(directions) == 1:
                grads = torch.autograd.grad(h, edges, rows[0], retain_graph=True, create_graph=create_graph,
                                            allow_unused=True)
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
            else:
                grads = torch.autograd.grad(h, edges, rows, is_grads_batched=True, retain_graph=True,
                                            create_graph=create_graph, allow_unused=True)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # a backward op without a batching rule: one direction at a time
            per_direction = [torch.autograd.grad(h, edges, d, retain_graph=True,
                                                 create_graph=create_graph, allow_unused=True)
                             for d in rows]
            grads = [None if column[0] is None else torch.stack(column) for column in zip(*per_direction)]
    return list(grads)


def grads_by_owner(owners: list[Owner], h: torch.Tensor, directions: range,
                   create_graph: bool, bare: bool = False, skip_unused: bool = False
                   ) -> dict[int, list[torch.Tensor]]:
    """The output gradients of every recorded call, per owner (by id), for ``directions``
    (``bare``: see :func:`output_grads`), zeros for an output h does not use; ``skip_unused``:
    without the owners none of whose outputs h uses (their parameters' gradients are all zero:
    they have no part)."""
    records = [(o, c) for o in owners for c in o.calls]
    with torch.enable_grad():
        grads = output_grads(h, [c for _, c in records], directions, create_graph, bare)
    lead = () if bare else (len(directions),)
    by_owner: dict[int, list[torch.Tensor | None]] = {}
    for (o, _), g in zip(records, grads):
        by_owner.setdefault(id(o), []).append(g)
    for o in owners:
        mine = by_owner[id(o)]
        if skip_unused and all(g is None for g in mine):
            del by_owner[id(o)]
        else:
            by_owner[id(o)] = [torch.zeros((*lead, *c.shape), dtype=c.dtype, device=c.device) if g is None else g
                               for g, c in zip(mine, o.calls)]
    return by_owner


def direction_groups(owners: list[Owner], k: int, device: torch.device) -> list[range]:
    """The k output directions in groups, one batched backward each.

    On the CPU, so that the norms need about a training step's memory: a step holds the
    parameters' gradients, a group its output gradients at every recorded output plus
    temporaries of their size (their squares), so a group's gradients take at most half the
    parameters' size (at least one direction). On an accelerator all k at once: every group
    repeats every operation, each paid in host time (the 10-output MLP's norms dispatched 309
    operations one direction at a time), and the chunk of samples is already sized for k
    output gradients of every recorded output (:func:`fast_chunk_size`)."""
    if functional.launch_bound(device):  # (looked up here: benchmarks/cost.py patches it)
        return [range(k)]
    per_direction = sum(c.shape.numel() for o in owners for c in o.calls)
    params = sum(p.numel() for o in owners for p in o.params.values())
    size = max(1, min(k, params // max(1, 2 * per_direction)))
    return [range(start, min(start + size, k)) for start in range(0, k, size)]



def fast_sq_norms(engine: FastEngine, batch: Batch, *, create_graph: bool = False, stream: bool = True
                  ) -> tuple[torch.Tensor, list[str]]:
    """Per-sample ||J_i||_F^2 of one chunk (model already in eval mode) and the modules that
    fell back.

    One output direction at a time (always for scalar outputs) the parts are taken as the
    backward passes each module (:func:`streamed_part`: less memory, and faster); several
    at a time, or with ``create_graph``, from all output gradients held together. With
    ``create_graph`` the result is differentiable w.r.t. the parameters (double backward gives
    grad reg); it then refuses per-module fallbacks, whose vmapped vjps are not.

    Raises:
        FastPathUnsupported: the model needs the whole-model torch.func path.
        NoSecondOrder: ``create_graph`` where a module falls back.
    """
    owners, h = engine.traced(batch)
    n, k = h.shape
    if create_graph and not all(o.closed_form for o in owners):
        fell_back = ", ".join(o.name for o in owners if not o.closed_form)
        raise NoSecondOrder(f"module(s) {fell_back} need a per-module fallback, which has no double backward")
    ties = ties_of(owners)
    # the norms accumulate in float32 at least (as torch.promote_types(h.dtype, float32), which
    # would be a dispatched operation)
    dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    total = None
    for directions in direction_groups(owners, k, h.device):
        part = None
        with torch.set_grad_enabled(create_graph):  # the parts' own graph only for double backward
            # (a tie's cross terms need both uses' gradients at once: held)
            if stream and len(directions) == 1 and not create_graph and not ties:
                part = streamed_part(owners, h, directions.start, retain_graph=directions.stop < k)
                if part is None:  # (its graph may be gone)
                    return fast_sq_norms(engine, batch, stream=False)
            if part is None:
                part = held_part(owners, h, directions, create_graph, ties)
        part = part.to(dtype)
        total = part if total is None else total + part
    return total, [o.name for o in owners if not o.closed_form]


def traced(model, batch: Batch, parameters: ParamDict | None = None, strict: bool = False
           ) -> tuple[list[Owner], torch.Tensor]:
    """The recording forward, each owner bound to its closed form where it has one and that
    form certified on this forward (:func:`~noisy_label_sgd.engines.certificate.certify`): a
    formula that fails falls back for its module (``strict``: raises, naming it).

    Raises:
        FastPathUnsupported: the model needs the whole-model path, or (``strict``) a formula failed.
    """
    owners, h = trace(model, batch)
    closed_forms.bind(owners)
    if parameters is None:
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for mismatch in certify(model, owners, h, parameters):
        o = mismatch.owner
        if strict:
            raise FastPathUnsupported(
                f"the closed form of module {o.name!r} ({type(o.module).__name__}) fails its certificate on this "
                f"model: its {mismatch.what} is {mismatch.relative:.2g} (relative) off autograd's (a forward that "
                "is not its class's, a forward hook, a formula registered wrong); method='auto' falls back for it")
        if o.original is not None:  # (the module's own call again, by its per-module fallback)
            if o in owners:  # (its other operations go with it)
                at = owners.index(o)
                owners[:] = [q for q in owners if q.original is not o.original]
                owners.insert(at, o.original)
        else:
            o.closed_form = o.gram = o.contract = o.one_sample = None
            o.bare = False
    return owners, h


def _owner_part(o: Owner, grads: list[torch.Tensor], n: int, bare: bool = False) -> torch.Tensor:
    """This module's part of every sample's squared norm, from its output gradients (one
    [c, *y.shape] per call, over c output directions; ``bare``: one direction's, [*y.shape])."""
    if bare and o.bare:
        return o.closed_form(grads[0])
    if bare:
        grads = [g.unsqueeze(0) for g in grads]
    if o.shared is not None:  # (one gradient per meeting with the samples)
        return o.closed_form(grads)
    if o.closed_form:  # (an affine map applied at several time steps: the steps as positions)
        return o.closed_form(grads_over_calls(grads))
    with sdpa_kernel(SDPBackend.MATH):  # vmapped: the fused attention kernels have no batching rule
        return per_module_fallback(o, grads, n)


def held_part(owners: list[Owner], h: torch.Tensor, directions: range, create_graph: bool,
              ties=()) -> torch.Tensor:
    """The modules' parts for ``directions`` from one (batched) backward that returns every
    module's output gradients together, and the cross terms of parameters tied between them.
    For one output per sample the gradients stay bare (no direction dim: an unsqueeze per layer,
    and its squeeze in a double backward, are operations more)."""
    bare = h.shape[1] == 1
    by_owner = grads_by_owner(owners, h, directions, create_graph, bare, skip_unused=not ties)
    parts = []
    if ties:
        tied = {id(o) for tie in ties for o, _ in tie.uses}
        with_directions = {i: [g.unsqueeze(0) for g in grads] if bare else grads
                           for i, grads in by_owner.items() if i in tied}
        parts.append(cross_terms(ties, with_directions, h.shape[0], create_graph))
    # closed forms first: their gradients are freed before the per-module fallbacks, which need
    # working memory of their own
    for o in sorted(owners, key=lambda o: not o.closed_form):
        if id(o) in by_owner:
            parts.append(_owner_part(o, by_owner.pop(id(o)), h.shape[0], bare))
    return sum_of(parts, h)


def streamed_part(owners: list[Owner], h: torch.Tensor, j: int, retain_graph: bool,
                  take: Callable[[Owner, list[torch.Tensor]], torch.Tensor] | None = None,
                  hookable: Callable[[Owner], bool] = lambda o: bool(o.closed_form)) -> torch.Tensor | None:
    """The modules' parts for output direction j from one plain backward that never holds all
    output gradients at once: a hook on each closed-form module's output node (attention's
    projections included) takes its part as the backward passes through. Modules whose inputs
    need no gradient (the backward ends there) and per-module fallbacks get their gradients as
    the backward's results instead. ``take(owner, grads)`` (default: the owner's part of the
    norms) is handed each owner's output gradients as they come, bare: [*y] per call (no
    direction dim: an unsqueeze per layer is an operation more); ``hookable`` says which owners
    may take them inside the backward.

    None when a hooked node on h's graph was not reached (a module whose output reaches h only
    through parameters used outside any module, or inputs that require grad): the caller then
    takes :func:`held_part` on a fresh trace. A module whose output h does not use (a pooler
    beside the hidden state the model returns) has no part.
    """
    n, k = h.shape
    take = take or (lambda o, grads: _owner_part(o, grads, n, bare=True))
    parts, reached, handles, ended = [], set(), [], []
    for o in owners:
        call = o.calls[0]
        needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in call.args)
        # (a shared output's part is a backward of its own: not inside this one)
        if not hookable(o) or not needs_grad or len(o.calls) > 1 or o.shared is not None:
            ended.append(o)
            continue

        def hook(grad_outputs, o=o, call=call):
            g = grad_outputs[call.edge.output_nr]
            if g is not None:
                parts.append(take(o, [g]))
            reached.add(id(o))

        handles.append(call.edge.node.register_prehook(hook))
    edges = [c.edge for o in ended for c in o.calls]
    if not edges:
        for handle in handles:
            handle.remove()
        return None
    try:
        with torch.enable_grad():
            seed = h.sum() if k == 1 else h[:, j].sum()
            grads = torch.autograd.grad(seed, edges, retain_graph=retain_graph, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    ended_ids = {id(o) for o in ended}
    missed = [o for o in owners if id(o) not in reached and id(o) not in ended_ids]
    if missed:  # (an owner whose output h never uses has no part: all its gradients are zero)
        on_graph = set(graph_nodes(h))
        if any(o.calls[0].edge.node in on_graph for o in missed):
            return None
    start = 0
    for o in ended:
        mine = grads[start:start + len(o.calls)]
        start += len(o.calls)
        if any(g is not None for g in mine):
            mine = [torch.zeros(c.shape, dtype=c.dtype, device=c.device) if g is None else g
                    for g, c in zip(mine, o.calls)]
            parts.append(take(o, mine))
    return sum_of([p for p in parts if p is not None], h)


def sum_of(parts: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The modules' parts [n] added: one stack and one sum, not an add for each (operations a GPU
    pays for in host time), whose backward hands every part the sum's gradient as it is (the
    stack's would select a piece for each)."""
    if not parts:
        return torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    if len(parts) == 1:
        return parts[0]
    if len({p.dtype for p in parts}) > 1:  # (under autocast: promoted pairwise)
        return functools.reduce(torch.add, parts)
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts) \
            and not functorch_transforms_active():
        return _SumOfParts.apply(*parts)
    return torch.stack(parts).sum(0)


class _SumOfParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *parts):
        return torch.stack(parts).sum(0)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) * len(ctx.needs_input_grad)


def per_module_fallback(owner: Owner, grads: list[torch.Tensor], n: int) -> torch.Tensor:
    """This module's part of the squared norms from the per-sample gradients of its own
    parameters (:func:`module_per_sample_grads`)."""
    per_sample = module_per_sample_grads(owner, grads, n)
    return sum(v.reshape(*v.shape[:2], -1).pow(2).sum(-1) for v in per_sample.values()).sum(0)
