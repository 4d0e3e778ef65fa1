"""How the probe measures a model: engines, chosen once per (model, probe inputs).

* ``functional.py``: the model as a pure function of its trainable parameters; evaluation mode.
* ``engine.py``: the questions every engine answers (norms, grad reg, J v, J^T u, K = J J^T).
* ``select.py``: which engine serves a model, and why.
* ``jacobian.py``, ``vmap.py``, ``fast.py``: the three engines ("jacobian", "vmap", "fast").
* ``trace.py``, ``closed_forms.py``: the fast engine's recording forward, and its per-layer
  formulas (the one place a new layer's closed form is added); ``ops.py``, ``elementwise.py``:
  the operations that take a module's parameters, which the formulas bind to.
* ``certificate.py``: every formula checked against autograd on the forward it measures.
* ``router.py``: each question to the fast engine, or to the vmap engine where it refuses.
* ``preflight.py``: what every engine assumes of a model (independent samples, gradients on).
* ``torch_internals.py``: the private PyTorch APIs used, in one place.
* ``tangent.py``: the tangent-space solvers, written against the engine interface only.
"""

from .closed_forms import register_closed_form
from .engine import Engine
from .select import select_engine

__all__ = ["Engine", "select_engine", "register_closed_form"]
