"""Fallback by composition: each question to the fast engine, or to the vmap engine where the fast one cannot answer.

The fast engine answers what its closed forms cover and raises
:class:`~noisy_label_sgd.engines.trace.FastPathUnsupported` otherwise. :class:`Router` asks it
first and remembers its refusals, so each is decided once: a refusal of the model (its trace)
sends every later question to the vmap engine; a refusal of grad reg's double backward alone
(:class:`~noisy_label_sgd.engines.trace.NoSecondOrder`: a module falls back) sends grad reg
there and keeps the norms on the fast engine. Every question sent to the vmap engine runs inside
its own contexts (:meth:`~noisy_label_sgd.engines.vmap.VmapEngine.contexts`), as the matrix-free
products (torch.func) always do. ``method="fast"`` (``strict``) refuses every question the same
way: a ValueError naming why, never a silent torch.func answer.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .engine import Engine
from .fast import FastEngine
from .functional import ParamDict
from .trace import FastPathUnsupported, NoSecondOrder
from .vmap import VmapEngine

T = TypeVar("T")


class Router(Engine):
    """The fast engine with the vmap engine behind it (see the module docstring).

    Args:
        strict: ``method="fast"``: refuse instead of routing to the vmap engine.
        second_order: why grad reg cannot be a double backward, where a look at the module
            types already says (a module without a closed form); None to try.
    """

    def __init__(self, *args, strict: bool, second_order: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fast = FastEngine(*args, strict=strict, **kwargs)
        self.vmap = VmapEngine(*args, **kwargs)
        self.helpers.extend([self.fast, self.vmap])
        self.strict = strict
        self.whole_model: str | None = None  # why every question goes to the vmap engine
        self.second_order = second_order  # why grad reg goes to the vmap engine

    @property
    def method(self) -> str:
        return self.vmap.method if self.whole_model is not None else self.fast.method

    def output_size(self) -> int:
        k = self.fast.output_size()
        self.product_chunk_size = self.fast.product_chunk_size
        return k

    def _refused(self, why: FastPathUnsupported, what: str) -> None:
        if self.strict:
            raise ValueError(f"method='fast' cannot {what} this model: {why}") from None
        if isinstance(why, NoSecondOrder):
            self.second_order = str(why)
        else:
            self.whole_model = str(why)

    def _by_vmap(self, question: Callable[[], T]) -> T:
        with self.vmap.contexts():
            return question()

    def _route(self, fast: Callable[[], T], vmap: Callable[[], T], what: str, second_order: bool = False) -> T:
        # (strict never records a refusal: it raises it)
        if self.whole_model is None and not (second_order and self.second_order is not None):
            try:
                return fast()
            except FastPathUnsupported as why:
                self._refused(why, what)
        return self._by_vmap(vmap)

    # -- the questions -------------------------------------------------------------------------

    def sq_norms(self) -> torch.Tensor:
        return self._route(self.fast.sq_norms, self.vmap.sq_norms, "handle")

    def grad(self) -> ParamDict:
        return self._route(self.fast.grad, self.vmap.grad, "differentiate the norms of", second_order=True)

    def norms_and_grad(self) -> tuple[torch.Tensor, ParamDict]:
        if self.whole_model is None and self.second_order is None:
            try:
                return self.fast.norms_and_grad()  # (one double backward gives both)
            except FastPathUnsupported as why:
                self._refused(why, "differentiate the norms of")
        if self.whole_model is not None:
            return self._by_vmap(self.vmap.norms_and_grad)
        return self.sq_norms(), self.grad()  # (the norms here, grad reg by torch.func)

    def jacobian(self) -> torch.Tensor:
        """J from the fast engine's trace, else by torch.func (as the products J v and J^T u
        always are): J is the projection's, not a measurement the closed forms make."""
        if self.whole_model is None:
            try:
                return self.fast.jacobian()
            except FastPathUnsupported:
                pass
        return self._by_vmap(self.vmap.jacobian)

    def gram(self) -> torch.Tensor | None:
        return self._route(self.fast.gram, lambda: None, "form K of")

    def gram_by_layers(self) -> torch.Tensor | None:
        return self._route(self.fast.gram_by_layers, lambda: None, "form K of")

    def J_times(self, v: torch.Tensor) -> torch.Tensor:
        return self._by_vmap(lambda: Engine.J_times(self, v))

    def J_transpose_times(self, u: torch.Tensor) -> torch.Tensor:
        return self._by_vmap(lambda: Engine.J_transpose_times(self, u))

    def linear_products(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        J_times, J_transpose_times = self._by_vmap(lambda: Engine.linear_products(self))
        return (lambda v: self._by_vmap(lambda: J_times(v))), (lambda u: self._by_vmap(lambda: J_transpose_times(u)))
