r"""The fast engine's certificate: every closed form checked against autograd on the forward it measures.

A closed form is a formula for what a layer computes; the module it is bound to may compute
something else (a subclass's ``forward``, a forward hook, a parameter also used elsewhere). So
each traced forward is certified before its numbers are used. With random weights :math:`u_{ij}`
over the (sample, output) pairs, one backward of :math:`\sum_{ij} u_{ij} h_{ij}` gives autograd's
gradient of every trainable parameter and the output gradient :math:`\bar g` at every recorded
layer output; each owner's formula then gives the gradient its per-sample gradients imply,
:math:`\sum_{ij} u_{ij} G_{ij}` (``Owner.contract``, one weight-gradient product a layer), and
per parameter the two must agree. By linearity in :math:`u` that holds for random :math:`u` with
probability one only if every per-sample gradient the formulas imply is right. A module without a
closed form is held to the same check through its own ``forward`` (a vjp at its recorded
inputs: what its per-module fallback differentiates). Then, for one random sample, each formula's
squared norm must equal that of its own per-sample gradient (``Owner.one_sample``): the norms'
shortcut (ghost norms, fused kernels) against the gradient just certified. The formulas read
sample i's gradient off row i of each output's sample dim; a second backward, with each sample's
weights scaled by a random s_i, certifies that: every recorded output's gradient must scale by
s_r along that dim (a forward that reorders the batch and restores it, ``x.flip(0)`` in and out,
passes the preflight but not this; the whole-model path is then needed).

A parameter whose sum disagrees beyond :func:`tolerance` is first given its modules' own
``forward`` instead of their formulas: if that agrees, those modules fall back
(:func:`certify` returns them, with the relative mismatch); if not, the parameter reaches the
output in a way no module call explains (a use outside its module, a global forward hook) and
the whole-model path is needed (:class:`~noisy_label_sgd.engines.trace.FastPathUnsupported`).

A certificate costs two backwards (a training step's, with the parameters' gradients, and one
to the layer outputs), a product per layer and one host sync to read the verdict. It is kept per model and per autograd graph
(:func:`graph_signature`: every node's type, its inputs, the parameters it accumulates into, and
where the trace recorded each layer output): a later forward with the same graph computes the
same functions of the parameters, so its verdict stands, and a forward whose graph changed (a
hook added, a weight used in a new place, another branch taken) is certified anew. The walk
costs host time only (ResNet-18: 132 nodes, 0.23 ms on the CPU that measured it), no operation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .trace import FastPathUnsupported, Owner, graph_nodes

# The random weights u: drawn from their own generator (never the global one), the same for
# every certificate, so that a measurement is a pure function of the model and the probe set.
CERTIFICATE_SEED = 0x5EED


def tolerance(dtype: torch.dtype) -> float:
    """The relative mismatch a certificate accepts: sqrt(eps) of the computation's dtype
    (1.5e-8 in float64, 3.5e-4 in float32, 0.088 in bfloat16). Autograd's and the formula's
    sums run the same terms in another order, a few eps apart; a wrong formula is off by O(1)
    (a factor, a transposed input, a missed use)."""
    return torch.finfo(dtype).eps ** 0.5


@dataclass
class Mismatch:
    """An owner whose formula failed the certificate, and by how much (relative, the worst of
    its parameters, or of its one-sample norm)."""

    owner: Owner
    relative: float
    what: str  # "gradient" (the formula against autograd) or "norm" (its shortcut against its gradient)


# model -> graph signature -> the verdict: (owner name, relative, what) per mismatch, or why the
# model needs the whole-model path
_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[tuple[str, float, str]] | str]] = \
    weakref.WeakKeyDictionary()
_VERDICTS_PER_MODEL = 16  # (graphs of one model kept; a model whose graph keeps changing recertifies)


def certify(model: nn.Module, owners: list[Owner], h: torch.Tensor, parameters: dict[str, nn.Parameter]
            ) -> list[Mismatch]:
    """The owners of a traced forward (``h`` [n, k] with its graph, kept for the measurement's
    own backward) whose formulas must fall back: from the verdict on the same graph where there
    is one, else from a certificate (:func:`run_certificate`).

    Raises:
        FastPathUnsupported: a parameter's gradient is not explained by its modules' calls.
    """
    key = graph_signature(h, owners)
    verdicts = _VERDICTS.setdefault(model, {})
    if key not in verdicts:
        try:
            verdict = [(m.owner.name, m.relative, m.what) for m in run_certificate(owners, h, parameters)]
        except FastPathUnsupported as why:
            verdict = str(why)
        if len(verdicts) >= _VERDICTS_PER_MODEL:
            verdicts.pop(next(iter(verdicts)))
        verdicts[key] = verdict
    verdict = verdicts[key]
    if isinstance(verdict, str):
        raise FastPathUnsupported(verdict)
    by_name = {o.name: o for o in owners}
    return [Mismatch(by_name[name], relative, what) for name, relative, what in verdict]


def graph_signature(h: torch.Tensor, owners: list[Owner]) -> tuple:
    """The autograd graph of ``h`` as a value: per node (in the order a walk from h finds them)
    its type, its inputs (as positions in that order) and, for a leaf, the parameter; then where
    each owner's calls were recorded and whether a formula is bound to it."""
    order = graph_nodes(h)
    position = {node: i for i, node in enumerate(order)}
    nodes = tuple((type(node).__name__, tuple((None if m is None else position.get(m), i) for m, i in node.next_functions),
                   id(getattr(node, "variable", None))) for node in order)
    records = tuple((o.name, o.contract is not None, o.original is not None,
                     tuple((position.get(c.edge.node), c.edge.output_nr) for c in o.calls)) for o in owners)
    return (tuple(h.shape[1:]), nodes, records)


def run_certificate(owners: list[Owner], h: torch.Tensor, parameters: dict[str, nn.Parameter]) -> list[Mismatch]:
    """Check every owner of a traced forward; return the owners whose formulas must fall back.

    Raises:
        FastPathUnsupported: a parameter's gradient is not explained by its modules' calls.
    """
    n, k = h.shape
    generator = torch.Generator().manual_seed(CERTIFICATE_SEED)
    u = torch.randn(n, k, generator=generator, dtype=torch.float64).to(h.device, h.dtype)
    sample = int(torch.randint(n, (), generator=generator))
    # (an operation's owner brings its module's own call: its own forward, where the formula fails)
    originals = list({id(o.original): o.original for o in owners if o.original is not None}.values())
    records = [(o, c) for o in owners for c in o.calls] + [(o, c) for o in originals for c in o.calls]
    names = {id(p): name for name, p in parameters.items()}
    leaves = list(parameters.values())
    # each sample's weights scaled by its own s_i: a recorded output's gradient must scale by s_r
    # along its sample dim, row r reaching sample r's outputs alone. Powers of two: a backward
    # that keeps the samples apart then scales each row exactly, its rounding too (a gradient
    # that is all rounding, where a sum over a LayerNorm's outputs cancels, included)
    s = torch.pow(2.0, torch.randint(-4, 5, (n,), generator=generator, dtype=torch.float64)).to(h.device, h.dtype)
    with torch.enable_grad():
        grads = torch.autograd.grad(h, [c.edge for _, c in records] + leaves, u, retain_graph=True,
                                    allow_unused=True)
        scaled = torch.autograd.grad(h, [c.edge for _, c in records], u * s[:, None], retain_graph=True,
                                     allow_unused=True)
    by_owner: dict[int, list[torch.Tensor]] = {}
    for (o, c), g in zip(records, grads):
        by_owner.setdefault(id(o), []).append(torch.zeros(c.shape, dtype=c.dtype, device=c.device) if g is None else g)
    autograd = {id(p): g for p, g in zip(leaves, grads[len(records):])}

    with torch.no_grad():
        implied = {id(o): _evaluated(o.contract, by_owner[id(o)]) if o.contract else
                   own_forward_contract(o, by_owner[id(o)]) for o in owners}
        errors = _errors(owners, implied, autograd, leaves)
        norms = []  # (a formula that cannot be evaluated on one sample: as far off as can be)
        failed_to_evaluate = (torch.zeros((), dtype=torch.float64, device=h.device),
                              torch.ones((), dtype=torch.float64, device=h.device))
        for o in owners:
            if o.one_sample is not None:
                norms.append((o, *_evaluated(o.one_sample, by_owner[id(o)], sample, empty=failed_to_evaluate)))
        rows = [(o, _relative(g2, g * s.reshape([n if d == c.sample_dim else 1 for d in range(g.dim())])))
                for (o, c), g, g2 in zip(records, grads, scaled)
                if g2 is not None and c.shape[c.sample_dim] == n]
        verdict = torch.stack([e for _, e in errors] + [_relative(a, b) for _, a, b in norms]
                              + [e for _, e in rows]).tolist()  # (the sync)
    limit = tolerance(h.dtype)
    for (o, _), e in zip(rows, verdict[len(errors) + len(norms):]):
        if e > limit:
            raise FastPathUnsupported(
                f"the output of module {o.name!r} mixes the samples: a row of its sample dim reaches another "
                f"sample's outputs ({e:.2g} relative; a forward that reorders the batch?)")
    mismatches: dict[int, Mismatch] = {}
    failed = [p for (p, _), e in zip(errors, verdict) if e > limit]
    if failed:
        # the modules' own forwards in place of their formulas, for the parameters that failed
        users = {id(o): o for o in owners for p in failed if any(q is p for q in o.params.values()) and o.contract}
        for o in users.values():
            if o.shared is not None:  # (no call of its own to fall back on: its output has no samples)
                relative = max(e for (p, _), e in zip(errors, verdict) if any(q is p for q in o.params.values()))
                raise FastPathUnsupported(
                    f"the per-sample gradients of module {o.name!r} ({type(o.module).__name__}), through where its "
                    f"output (shared by all samples) meets them, are {relative:.2g} (relative) off autograd's")
        with torch.no_grad():
            for i, o in users.items():
                module_call = o.original or o
                implied[i] = renamed(own_forward_contract(module_call, by_owner[id(module_call)]), module_call, o)
            again = torch.stack([e for _, e in _errors(owners, implied, autograd, leaves, only=failed)]).tolist()
        for p, e in zip(failed, again):
            if e > limit:
                raise FastPathUnsupported(
                    f"the gradient of parameter {names.get(id(p), '?')!r} through the calls of its modules is "
                    f"{e:.2g} (relative) off autograd's: it reaches the output another way (a use outside its "
                    "module's call, a global forward hook)")
        worst = {p: e for (p, _), e in zip(errors, verdict) if e > limit}
        for i, o in users.items():
            relative = max(e for p, e in worst.items() if any(q is p for q in o.params.values()))
            mismatches[i] = Mismatch(o, relative, "gradient")
    for (o, _, _), e in zip(norms, verdict[len(errors):len(errors) + len(norms)]):
        if e > limit and id(o) not in mismatches:
            mismatches[id(o)] = Mismatch(o, e, "norm")
    return list(mismatches.values())


def _evaluated(formula, *args, empty=None):
    """A formula's result, or an empty one where it cannot be evaluated on this call (its shapes
    are not the call's: a RuntimeError from an op inside; never an out-of-memory error, which is
    the caller's to see). An empty contract implies no gradient, so its parameters fail."""
    try:
        return formula(*args)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        return {} if empty is None else empty


def _errors(owners: list[Owner], implied: dict[int, dict[str, torch.Tensor]], autograd: dict[int, torch.Tensor | None],
            leaves: list[torch.Tensor], only: list[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per trainable parameter (``leaves``), the relative distance between the sum over its
    owners of what they imply and autograd's gradient: a parameter no owner holds implies none
    (a child's weight its parent applies, its module never called, left out of every formula)."""
    summed: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {id(p): (p, None) for p in leaves}
    for o in owners:
        for name, p in o.params.items():
            g = implied[id(o)].get(name)  # (none: the formula implies no gradient, or could not say)
            before = summed.get(id(p), (p, None))[1]
            g = None if g is None else g.double()
            summed[id(p)] = (p, g if before is None else before if g is None else before + g)
    errors = []
    for pid, (p, total) in summed.items():
        if only is not None and not any(q is p for q in only):
            continue
        reference = autograd.get(pid)
        reference = torch.zeros(p.shape, dtype=torch.float64, device=p.device) if reference is None else reference.double()
        total = torch.zeros_like(reference) if total is None else total
        if reference.shape != total.shape:  # (the formula's gradient has another shape: wrong)
            errors.append((p, torch.ones((), dtype=torch.float64, device=total.device)))
            continue
        errors.append((p, _relative(total, reference)))
    return errors


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / max(||a||, ||b||) (0 where both vanish)."""
    a, b = a.double(), b.double()
    scale = torch.maximum(a.norm(), b.norm())
    return torch.where(scale > 0, (a - b).norm() / scale, torch.zeros_like(scale))


def renamed(gradients: dict[str, torch.Tensor], source: Owner, target: Owner) -> dict[str, torch.Tensor]:
    """Gradients named as ``source`` names its parameters, named as ``target`` does."""
    names = {id(p): name for name, p in source.params.items()}
    return {name: gradients[names[id(p)]] for name, p in target.params.items() if names.get(id(p)) in gradients}


def own_forward_contract(owner: Owner, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of the owner's parameters through its own ``forward`` at its recorded
    inputs (hooks not run: the trace records the module's own output), at output gradients
    ``grads``, summed over its calls."""
    names = list(owner.params)
    total: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        for call, g in zip(owner.calls, grads):
            # (the inputs as constants: a module called twice has its first call upstream of its second)
            args = [t.detach() if isinstance(t, torch.Tensor) else t for t in call.args]
            kwargs = {key: t.detach() if isinstance(t, torch.Tensor) else t for key, t in call.kwargs.items()}
            out = owner.module.forward(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if call.rows > 1:  # (recorded with its rows per sample unflattened)
                g = g.flatten(call.sample_dim, call.sample_dim + 1)
            if not isinstance(out, torch.Tensor) or out.shape != g.shape or not out.requires_grad:
                return {}  # (nothing to compare: the parameters' sums then miss this use and fail)
            grads_call = torch.autograd.grad(out, list(owner.params.values()), g, allow_unused=True)
            for name, d in zip(names, grads_call):
                if d is not None:
                    total[name] = total[name] + d if name in total else d
    return total
