r"""A parameter shared by two modules (tied weights: a language model's token embedding and
output head), on the fast path.

Its per-sample gradient is the sum of what each module's use contributes, :math:`G = G_A + G_B`,
so :math:`\|G\|^2 = \|G_A\|^2 + \|G_B\|^2 + 2\langle G_A, G_B\rangle`: each owner's closed form
(or per-module fallback) gives its own part as if the parameter were its alone, and
:func:`cross_terms` adds the inner products between the uses:

* ``nn.Embedding`` and ``nn.Linear`` on one weight [V, d] (GPT-2, Llama, BERT's decoder), in
  closed form: :math:`\langle G_E, G_L\rangle = \sum_{t,s} g^L_{s}[x_t]\,(g^E_t \cdot a_s)` over
  the embedding's positions t (index :math:`x_t`, output gradient :math:`g^E_t`) and the
  Linear's positions s (input :math:`a_s`, output gradient :math:`g^L_s`), no per-sample
  gradient formed; differentiable, so grad reg stays a double backward;
* any other pair from the two modules' per-sample gradients of the parameter
  (:mod:`~noisy_label_sgd.engines.per_sample`): differentiable where both come without
  autograd (affine maps, convolutions), else norms only (grad reg then refuses the fast path).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
from torch import nn

from .per_sample import per_sample_direct, per_sample_grads
from .trace import NoSecondOrder, Owner


@dataclass
class Tie:
    """One trainable parameter and every (owner, its name there) that uses it."""

    parameter: nn.Parameter
    uses: list[tuple[Owner, str]]


def ties_of(owners: list[Owner]) -> list[Tie]:
    """The parameters that more than one owner holds."""
    by_id: dict[int, Tie] = {}
    for o in owners:
        for name, p in o.params.items():
            by_id.setdefault(id(p), Tie(p, [])).uses.append((o, name))
    return [tie for tie in by_id.values() if len(tie.uses) > 1]


def cross_terms(ties: list[Tie], by_owner: dict[int, list[torch.Tensor]], n: int, create_graph: bool) -> torch.Tensor:
    """2 sum over pairs of uses of <G_A, G_B> per sample, summed over the output directions of
    the gradients in ``by_owner`` (owner id -> [c, *output.shape] per call)."""
    total = 0
    for tie in ties:
        for (a, name_a), (b, name_b) in combinations(tie.uses, 2):
            total = total + 2 * inner_product(a, name_a, b, name_b, by_owner, n, create_graph)
    return total


def inner_product(a: Owner, name_a: str, b: Owner, name_b: str, by_owner, n: int, create_graph: bool) -> torch.Tensor:
    for first, second in ((a, b), (b, a)):
        if _embedding_and_linear(first, second):
            return embedding_linear_inner(first, second, by_owner[id(first)][0], by_owner[id(second)][0])
    if create_graph and not (per_sample_direct(a) and per_sample_direct(b)):
        raise NoSecondOrder(f"the parameter tied between {a.name!r} and {b.name!r} has no differentiable "
                                  "cross term")
    ga = per_sample_grads(a, by_owner[id(a)], n)[name_a]
    gb = per_sample_grads(b, by_owner[id(b)], n)[name_b]
    return (ga * gb).flatten(2).sum(-1).sum(0)


def _embedding_and_linear(embedding: Owner, linear: Owner) -> bool:
    e, lin = embedding.module, linear.module
    return (isinstance(e, nn.Embedding) and e.max_norm is None and not e.scale_grad_by_freq
            and type(lin) is nn.Linear and e.weight is lin.weight
            and embedding.closed_form is not None and linear.closed_form is not None  # (certified)
            and all(len(o.calls) == 1 and o.calls[0].sample_dim == 0 and len(o.calls[0].args) == 1
                    for o in (embedding, linear)))


def embedding_linear_inner(embedding: Owner, linear: Owner, g_embedding: torch.Tensor,
                           g_linear: torch.Tensor) -> torch.Tensor:
    """<G_E, G_L> per sample, summed over output directions: the Linear's output gradient read
    at the embedding's indices, times the embedding's output gradient dotted with the Linear's
    input, over all pairs of positions (the padding index's row gets no gradient)."""
    c, n = g_embedding.shape[:2]
    index = embedding.calls[0].args[0].reshape(n, -1)  # [n, T]
    a = linear.calls[0].args[0].reshape(n, -1, linear.module.in_features)  # [n, S, d]
    g_e = g_embedding.reshape(c, n, index.shape[1], -1)  # [c, n, T, d]
    g_l = g_linear.reshape(c, n, a.shape[1], -1)  # [c, n, S, V]
    at_indices = torch.gather(g_l, 3, index[None, :, None, :].expand(c, n, a.shape[1], index.shape[1]))
    dots = torch.einsum("cntd,nsd->cnst", g_e, a.to(g_e.dtype))  # [c, n, S, T]
    products = at_indices * dots
    if embedding.module.padding_idx is not None:
        products = products * (index != embedding.module.padding_idx)[None, :, None, :]
    return products.sum((0, 2, 3))
