r"""Values made from parameters alone that every sample shares: where they meet the samples.

A module may compute, from its parameters and constants only, a value all samples share (a
module's output, a root; or, inside a module's own code, a function of one of its parameters:
:mod:`~noisy_label_sgd.engines.ops`). T5's
relative position bias is an ``nn.Embedding`` looked up at the buckets of a [q, k] grid of
relative positions: [q, k, heads], permuted to [1, heads, q, k] and handed to every layer's
attention as the mask its scores [n, heads, q, k] are offset by. That output has no sample dim,
so no per-sample gradient can be read off it. The samples first meet it at the broadcasting
operations that combine it with their activations (an add, a product, attention's mask): there
the per-sample gradient of the shared operand S is that operation's output gradient per sample,
summed where S broadcasts. So while the trace runs, :class:`SharedValues` (a thread-local
``TorchFunctionMode``) follows the values derived from such an output (a root) alone, and hands
each meeting S expanded along the samples' dim instead: the same result, whose backward now
stops at one copy of S per sample, the per-sample gradients of S at that edge (a
:class:`Meeting`). The root's parameters' per-sample gradients follow by the chain rule through
the parameter-only function: one batched vjp of the meetings' operands to the root's value
(``is_grads_batched``), then one backward of the function that made it, replayed under vmap on
its parameters expanded per sample (where it does not run under vmap, one batched vjp all the
way: a vmapped backward of an indexed table or an embedding loops over the samples),
differentiable once more for grad reg (:class:`SharedUse`). They are as large as the
parameters per sample (T5's bias table: buckets x heads), so the norms are taken from them.

Which operations keep a value shared and which meet the samples is read off the sizing forwards
of one sample and of two (:func:`survey`): an operation whose result has the same shape in both
keeps it shared; one whose result has one sample more in one dim meets the samples there, or m
rows more where each sample holds m rows of that dim (Swin's relative position bias, added to
the scores of every window: [n windows, heads, T, T]). There the shared operand is handed
expanded to [.., n, m, ..] and flattened: its copy [.., n, 1, ..] before the second expand is the
edge, whose gradient is already summed over a sample's rows (that the rows are in sample-major
blocks, the certificate's row check holds every measurement to). Any
other use (a shared value meeting the samples by an operation that does not broadcast it, or
in several dims) leaves the model to the whole-model path, or, for a function of a parameter
inside a module's own code, that module to its per-module fallback. The certificate holds the per-sample
gradients against autograd like every closed form's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

F = nn.functional

# the operations that broadcast their tensor operands against each other: a shared operand of
# size 1 in the samples' dim may be expanded there without changing the result
BROADCASTING = {
    torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
    torch.sub, torch.Tensor.sub, torch.Tensor.sub_, torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__isub__,
    torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
    torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.where,
}
ATTENTION = F.scaled_dot_product_attention  # (broadcasts its mask: attn_mask, its 4th argument)


@dataclass(frozen=True)
class Verdict:
    """What one operation on a shared value does, as the sizing forwards saw it: the function
    (checked again on every trace), and the dim of its result where the samples run when it
    meets them (None: its result is shared too), of its ``dims`` dims."""

    func: object
    meets: int | None
    dims: int = 0
    rows: int = 1  # rows per sample in that dim


@dataclass
class Meeting:
    """A shared operand handed to an operation expanded along the samples: the operand, the
    gradient edge of its expanded copy and that copy's shape, and the roots it derives from."""

    operand: torch.Tensor
    edge: torch.autograd.graph.GradientEdge | None
    shape: torch.Size
    sample_dim: int
    roots: frozenset[str]


class SharedValues(TorchFunctionMode):
    """Follows the tensors derived from the roots' outputs alone (:meth:`add_root`).

    Surveying (``verdicts`` None) it records every operation on a tracked tensor and tracks
    every result (:attr:`seen`); tracing, it tracks the results :data:`verdicts` calls shared
    and hands the operations that meet the samples their shared operands expanded to ``n``
    (:attr:`meetings`). ``failed`` says why the trace cannot use it (an operation other than
    the sizing forwards saw, or one that does not broadcast its shared operand); where the
    values that meet the samples so derive from the ``optional`` roots alone (functions of a
    parameter inside a module's own code), those are left ``unmet`` instead and their module
    falls back.
    """

    def __init__(self, verdicts: tuple[Verdict, ...] | None = None, n: int = 0, gradient_edge=None,
                 optional: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.verdicts, self.n, self.gradient_edge, self.optional = verdicts, n, gradient_edge, optional
        self.unmet: set[str] = set()
        self.roots: set[str] = set()  # (the owners whose outputs were followed)
        self.outputs: dict[str, torch.Tensor] = {}  # (and those outputs)
        self.roots_of: dict[int, frozenset[str]] = {}
        self.kept: list[torch.Tensor] = []  # (alive while their ids are keys)
        # surveying: per operation, its function, the producers of its tracked inputs (an index
        # into seen, or a root's name) and its result's shape; and per tracked input, should
        # the operation meet the samples, its roots, its shape and whether it is attention's mask
        self.seen: list[tuple[object, tuple, torch.Size]] = []
        self.operands: list[list[tuple[frozenset[str], torch.Size, bool]]] = []
        self.produced: dict[int, int | str] = {}
        self.meetings: list[Meeting] = []
        self.index = 0  # tracing: the next operation's verdict
        self.failed: str | None = None

    def add_root(self, output: torch.Tensor, name: str) -> None:
        self.roots.add(name)
        self.outputs[name] = output
        self._track(output, frozenset((name,)))
        self.produced[id(output)] = name

    def _track(self, t: torch.Tensor, roots: frozenset[str]) -> None:
        self.roots_of[id(t)] = self.roots_of.get(id(t), frozenset()) | roots
        self.kept.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
        tracked = [t for t in flat if isinstance(t, torch.Tensor) and id(t) in self.roots_of]
        if not tracked or self.failed is not None:
            return func(*args, **kwargs)
        roots = frozenset().union(*(self.roots_of[id(t)] for t in tracked))
        if self.verdicts is None:
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor):
                self.seen.append((func, tuple(self.produced[id(t)] for t in tracked), result.shape))
                mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None) if func is ATTENTION else None
                self.operands.append([(self.roots_of[id(t)], t.shape, t is mask) for t in tracked])
                self.produced[id(result)] = len(self.seen) - 1
                self._track(result, roots)
            return result
        verdict = self.verdicts[self.index] if self.index < len(self.verdicts) else None
        # (==: an attribute's getter is a new method-wrapper at each access, equal to the last)
        if verdict is None or verdict.func != func:
            result = func(*args, **kwargs)
            if not isinstance(result, torch.Tensor):  # (a size, a flag: the survey keeps tensors only)
                return result
            name = getattr(func, "__name__", func)
            self.failed = self._named(roots, f"takes another path than for one sample ({name})")
            return result
        self.index += 1
        if verdict.meets is None:
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor):
                self._track(result, roots)
            return result
        return self._meet(func, args, kwargs, tracked, roots, verdict)

    def _meet(self, func, args, kwargs, tracked, roots, verdict: Verdict):
        """The operation with its shared operands expanded along the samples' dim."""
        name = getattr(func, "__name__", str(func))
        if func is ATTENTION:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if len(tracked) != 1 or tracked[0] is not mask:
                return self._fail(roots, f"is a query, key or value of {name}", func, args, kwargs)
        elif func not in BROADCASTING:
            return self._fail(roots, f"meets them in {name}, which has no rule", func, args, kwargs)
        swapped = {}
        for t in tracked:
            made = _expanded(t, verdict.meets, verdict.dims, self.n, verdict.rows)
            if made is None:
                return self._fail(roots, f"is not broadcast along them in {name}", func, args, kwargs)
            per_sample, swapped[id(t)], at = made
            edge = self.gradient_edge(per_sample) if torch.is_grad_enabled() and per_sample.requires_grad else None
            self.meetings.append(Meeting(t, edge, per_sample.shape, at, self.roots_of[id(t)]))
        swap = lambda a: swapped.get(id(a), a) if isinstance(a, torch.Tensor) else (
            type(a)(swap(x) for x in a) if isinstance(a, (list, tuple)) else a)
        return func(*swap(args), **{key: swap(value) for key, value in kwargs.items()})

    def _fail(self, roots: frozenset[str], why: str, func, args, kwargs):
        """The operation as it is, and why the trace cannot use it (or the optional roots unmet)."""
        if roots <= self.optional:
            self.unmet |= roots
        else:
            self.failed = self._named(roots, why)
        return func(*args, **kwargs)

    @staticmethod
    def _named(roots: frozenset[str], why: str) -> str:
        names = ", ".join(repr(r) for r in sorted(roots))
        return f"a value made by module {names} alone (shared by all samples) {why}"


def _expanded(t: torch.Tensor, d: int, dims: int, n: int, rows: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``t`` expanded along dim ``d`` of a result of ``dims`` dims it is broadcast to
    (right-aligned: leading dims added where it has fewer) to ``n`` samples of ``rows`` rows
    each: the copy with one entry per sample (the meeting's edge), the operand to hand the
    operation (the same, for one row per sample; else that copy expanded over the rows and
    flattened) and the copy's sample dim; None where ``t`` has more than one entry there."""
    if not _broadcast_along(t.shape, d, dims):
        return None
    at = d - (dims - t.dim())
    if rows == 1:  # (an expand adds the leading dims the broadcast would)
        sizes = [-1] * t.dim() if at >= 0 else [n] + [1] * (-at - 1) + [-1] * t.dim()
        if at >= 0:
            sizes[at] = n
        expanded = t.expand(sizes)
        return expanded, expanded, max(at, 0)
    if at < 0:  # (the leading dims the broadcast adds, made explicit: the samples' first)
        t, at = t.reshape((1,) * -at + tuple(t.shape)), 0
    per_sample = t.unsqueeze(at).expand(*t.shape[:at], n, *t.shape[at:])  # [.., n, 1, ..]
    over_rows = per_sample.expand(*t.shape[:at], n, rows, *t.shape[at + 1:])
    return per_sample, over_rows.flatten(at, at + 1), at


def _broadcast_along(shape: torch.Size, d: int, dims: int) -> bool:
    at = d - (dims - len(shape))
    return at < 0 or shape[at] == 1


def survey(one: SharedValues, two: SharedValues) -> tuple[tuple[Verdict, ...], int, frozenset[str]] | str:
    """The verdicts on the operations a trace sees on shared values (those with a shared input),
    from the surveys of a forward of one sample and of two, the meetings' floats per sample and
    the roots that meet the samples where no rule takes them (their trace would fail); or why
    they do not fit (a result with the samples in no single dim, or a result shared by all
    samples made from one that is not)."""
    if [(f, p) for f, p, _ in one.seen] != [(f, p) for f, p, _ in two.seen]:
        return "its forward takes another path for two samples than for one"
    shared: dict[int | str, bool] = {}
    verdicts, floats, unmet = [], 0, set()
    for index, ((func, producers, a), (_, _, b)) in enumerate(zip(one.seen, two.seen)):
        inputs_shared = [isinstance(p, str) or shared[p] for p in producers]
        differ = [d for d, (x, y) in enumerate(zip(a, b)) if x != y]
        name = getattr(func, "__name__", str(func))
        if len(a) != len(b) or len(differ) > 1 or differ and b[differ[0]] != 2 * a[differ[0]]:
            if any(inputs_shared):
                return f"a value shared by all samples meets them in {name}, with the samples in no single dim"
            shared[index] = False
            continue
        # (made from the samples' values alone it is theirs, whatever its shape: a mask made by
        # x.new_zeros, torchvision's Swin)
        shared[index] = not differ and any(inputs_shared)
        if not any(inputs_shared):  # (downstream of a meeting: the samples' own values)
            continue
        if not differ and not all(inputs_shared):
            return f"{name} makes a value shared by all samples from one that is not (a batch statistic?)"
        verdicts.append(Verdict(func, differ[0] if differ else None, len(a), a[differ[0]] if differ else 1))
        if differ:
            floats += b.numel() // 2
            # (as the trace will: a rule for the shared operands, each broadcast along the samples)
            met = [operand for p, operand in zip(producers, one.operands[index]) if isinstance(p, str) or shared[p]]
            rule = [m for _, _, m in met] == [True] if func is ATTENTION else func in BROADCASTING
            if not rule or not all(_broadcast_along(shape, differ[0], len(a)) for _, shape, _ in met):
                unmet = unmet.union(*(roots for roots, _, _ in met))
    return tuple(verdicts), floats, frozenset(unmet)


@dataclass
class SharedUse:
    """A root's parameters reached through its meetings' operands (one call each of its owner):
    the per-sample gradients by one batched vjp of the operands, or, where the root's own
    forward ``replay`` (parameters -> its output) runs under vmap, by a batched vjp to the root's
    ``output`` and one backward of that forward replayed on parameters expanded per sample (a
    vmapped backward of an indexed table loops over the samples: Swin's relative position bias)."""

    params: dict[str, nn.Parameter]
    operands: list[torch.Tensor] = field(default_factory=list)
    sample_dims: list[int] = field(default_factory=list)
    output: torch.Tensor | None = None
    replay: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    def per_sample(self, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """name -> [c, n, *param.shape] from output gradients [c, *expanded.shape] per meeting."""
        c, n = grads[0].shape[0], grads[0].shape[self.sample_dims[0] + 1]
        cotangents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (an operand met several times: one seed)
        for g, s, d in zip(grads, self.operands, self.sample_dims):
            g = g.movedim(d + 1, 1).reshape(c * n, *s.shape)
            cotangents[id(s)] = (s, g + cotangents[id(s)][1] if id(s) in cotangents else g)
        names = list(self.params)
        operands, seeds = zip(*cotangents.values())
        create_graph = torch.is_grad_enabled()
        if self.replay is None:
            found = torch.autograd.grad(operands, [self.params[name] for name in names], seeds,
                                        retain_graph=True, create_graph=create_graph, allow_unused=True,
                                        is_grads_batched=True)
        else:
            at_output = torch.autograd.grad(operands, self.output, seeds, retain_graph=True, create_graph=create_graph,
                                            is_grads_batched=True)[0]
            with torch.enable_grad():
                expanded = {name: self.params[name].expand(c * n, *self.params[name].shape) for name in names}
                replayed = vmap(self.replay)(expanded)
            found = torch.autograd.grad(replayed, list(expanded.values()), at_output, create_graph=create_graph,
                                        allow_unused=True)
        return {name: (torch.zeros((c * n, *self.params[name].shape), dtype=grads[0].dtype, device=grads[0].device)
                       if g is None else g).reshape(c, n, *self.params[name].shape) for name, g in zip(names, found)}

    def sq_norms(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample squared norms [n], summed over the directions of grads [c, *expanded.shape]."""
        per_sample = self.per_sample(grads)
        return sum(g.pow(2).sum([d for d in range(g.dim()) if d != 1]) for g in per_sample.values())

    def contract(self, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-sample gradients summed over samples, for one output gradient per meeting (bare)."""
        return {name: g.sum((0, 1)) for name, g in self.per_sample([g.unsqueeze(0) for g in grads]).items()}
