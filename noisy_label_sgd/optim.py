"""Label-noise SGD, and label noise for any torch optimizer through torch's own hooks.

The optimizer algorithm is untouched: noise enters through the loss or output hooks, and the
optimizer only keeps the stream in step. Four hooks do that bookkeeping:

* step pre-hook: a closure passed to ``step`` is wrapped so that each evaluation restarts the
  step's draws (LBFGS and line searches see one noise draw per step);
* step post-hook: ``noise.advance()``, so the next step draws fresh noise (not for the
  state-creating ``step()`` of torch.distributed.checkpoint's ``get_state_dict`` /
  ``set_state_dict``, which trains nothing);
* state_dict post-hook / load_state_dict pre-hook: the stream position travels with the
  optimizer checkpoint, under the key ``"label_noise"`` of its first parameter group: the part
  of an optimizer's state dict that torch.distributed.checkpoint keeps besides per-parameter
  state (a top-level key, where checkpoints before it had the position, is dropped there).

``LabelNoiseSGD`` does not override ``step``: torch wraps ``step`` of every optimizer class
with its hook runner, and a subclass calling the wrapped parent would run hooks twice.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import ParamsT
from torch.utils.hooks import RemovableHandle

from .engines.torch_internals import inside_dcp_optimizer_init
from .hooks import NoisyLoss, attach_output_noise, noisy_loss
from .noise import LabelNoise, StdSchedule

__all__ = ["LabelNoiseSGD", "add_label_noise", "label_noise_of", "remove_label_noise", "STATE_KEY"]

STATE_KEY = "label_noise"


def label_noise_of(optimizer: torch.optim.Optimizer) -> LabelNoise | None:
    """The LabelNoise attached to ``optimizer`` by add_label_noise/LabelNoiseSGD, else None."""
    return getattr(optimizer, "_label_noise", None)


def remove_label_noise(optimizer: torch.optim.Optimizer) -> LabelNoise | None:
    """Undo :func:`add_label_noise`: the optimizer's hooks removed, its stream free for another
    optimizer (a trainer that replaces its optimizer). Returns the stream, or None."""
    noise = label_noise_of(optimizer)
    if noise is not None:
        for handle in optimizer._label_noise_handles:  # type: ignore[attr-defined]
            handle.remove()
        del optimizer._label_noise, optimizer._label_noise_handles  # type: ignore[attr-defined]
        noise._optimizer = None
    return noise


def _refuse_beside_noise(**arguments: Any) -> None:
    """``noise=`` replaces the stream's arguments: any of them given beside it is refused
    (by the names the caller used)."""
    defaults = {"distribution": "gaussian", "seed": 0}
    given = [name for name, value in arguments.items() if value != defaults.get(name)]
    if given:
        raise ValueError(f"pass either noise= or its arguments, not both (got noise= and {'=, '.join(given)}=)")


def add_label_noise(
    optimizer: torch.optim.Optimizer,
    std: StdSchedule | None = None,
    distribution: str = "gaussian",
    seed: int = 0,
    *,
    noise: LabelNoise | None = None,
    p: float | None = None,
    num_classes: int | None = None,
    rank: int | None = None,
) -> LabelNoise:
    """Give any torch optimizer a label-noise stream that advances once per ``step()``.

    Use the returned :class:`LabelNoise` with :func:`noisy_loss` or
    :func:`attach_output_noise`. ``optimizer.state_dict()`` then carries the stream position,
    and ``optimizer.load_state_dict`` restores it.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        std, distribution, seed, p, num_classes, rank: as for :class:`LabelNoise`.
        noise: a ready stream instead of the arguments above.

    Returns:
        the optimizer's :class:`LabelNoise`.

    Raises:
        TypeError: ``optimizer`` is not an optimizer.
        RuntimeError: label noise is already attached to this optimizer, or ``noise`` already
            advances with another one.
        ValueError: ``noise`` together with any of the arguments it replaces.

    Example:
        >>> opt = torch.optim.Adam(model.parameters())
        >>> noise = add_label_noise(opt, std=0.1, seed=0)
        >>> loss_fn = noisy_loss(nn.MSELoss(), noise)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if label_noise_of(optimizer) is not None:
        raise RuntimeError("label noise is already attached to this optimizer")
    if noise is None:
        if std is None and distribution != "flip":
            raise TypeError(
                f"add_label_noise needs std (the standard deviation of {distribution!r} label noise); "
                "pass std=0.0 for a stream without noise"
            )
        noise = LabelNoise(std, distribution, seed, p=p, num_classes=num_classes, rank=rank)
    elif not isinstance(noise, LabelNoise):
        raise TypeError(f"noise must be a LabelNoise, got {type(noise).__name__}")
    else:
        _refuse_beside_noise(std=std, distribution=distribution, seed=seed, p=p, num_classes=num_classes, rank=rank)
    owner = noise._optimizer() if noise._optimizer is not None else None
    if owner is not None:
        raise RuntimeError(
            f"this LabelNoise already advances with another optimizer ({type(owner).__name__}): shared, it would "
            "advance twice per step; give each optimizer its own LabelNoise (another seed or rank)"
        )

    def rewinding(closure: Callable[[], Any]) -> Callable[[], Any]:
        first_call, first_samples = noise.call, noise.samples_this_step

        def closure_with_same_noise() -> Any:
            noise.call, noise.samples_this_step = first_call, first_samples  # the same draws again
            return closure()

        return closure_with_same_noise

    def pre_step(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        # torch passes the optimizer itself as args[0]; the closure is args[1] or a keyword
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": rewinding(kwargs["closure"])}
        if len(args) > 1 and args[1] is not None:
            return (args[0], rewinding(args[1]), *args[2:]), kwargs
        return None

    def post_step(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not inside_dcp_optimizer_init():
            noise.advance()

    def save(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        state_dict["param_groups"][0][STATE_KEY] = noise.state_dict()  # (torch builds these dicts anew)
        return state_dict

    def load(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        # (torch passes a shallow copy: the caller's groups are copied before one is changed)
        groups = list(state_dict.get("param_groups", ()))
        if groups and STATE_KEY in groups[0]:
            groups[0] = dict(groups[0])
            noise.load_state_dict(groups[0].pop(STATE_KEY))
            state_dict["param_groups"] = groups
        elif STATE_KEY in state_dict:  # (checkpoints made before the position moved into the group)
            noise.load_state_dict(state_dict.pop(STATE_KEY))
        else:
            warnings.warn(
                "optimizer state_dict has no label-noise state (saved without label noise?); "
                f"the noise stream stays at step {noise.step}",
                stacklevel=3,
            )
        return state_dict

    post_handle = optimizer.register_step_post_hook(post_step)
    # advance before any other post-hook, so that hooks registered earlier (a monitor) also see
    # the completed step count; torch has no prepend flag for step hooks
    optimizer._optimizer_step_post_hooks.move_to_end(post_handle.id, last=False)
    optimizer._label_noise = noise  # type: ignore[attr-defined]
    noise._optimizer = weakref.ref(optimizer)
    optimizer._label_noise_handles = [  # type: ignore[attr-defined]
        optimizer.register_step_pre_hook(pre_step),
        post_handle,
        optimizer.register_state_dict_post_hook(save),
        optimizer.register_load_state_dict_pre_hook(load),
    ]
    return noise


class LabelNoiseSGD(torch.optim.SGD):
    r"""``torch.optim.SGD`` whose training labels get fresh noise at every step.

    Label-noise SGD (Blanc et al., COLT 2020) runs SGD on
    :math:`\ell(\theta) = \|h(x; \theta) - (y + \epsilon_t)\|^2` with fresh independent
    :math:`\epsilon_t` at every step :math:`t`. The update itself is exactly ``SGD``'s; the
    noise enters through :meth:`noisy_loss` or :meth:`attach_output_noise`. With
    ``noise_std=0`` it is bit-for-bit ``torch.optim.SGD``.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach,
            differentiable, fused: as for ``torch.optim.SGD``.
        noise_std: label-noise standard deviation, or a callable ``step -> std``.
        distribution: ``"gaussian"``, ``"rademacher"``, ``"uniform"``, or ``"flip"`` for
            class labels (with ``p`` and ``num_classes``, no ``noise_std``; the loss is then
            e.g. ``opt.noisy_loss(nn.CrossEntropyLoss())``).
        seed: noise stream seed.
        p, num_classes, rank: as for :class:`LabelNoise`.
        noise: a ready :class:`LabelNoise` instead of the arguments above.

    Example:
        >>> opt = LabelNoiseSGD(model.parameters(), lr=0.05, momentum=0.9, noise_std=0.1)
        >>> loss_fn = opt.noisy_loss(nn.MSELoss())
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     loss_fn(model(x), y).backward()
        ...     opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        noise_std: StdSchedule | None = None,
        distribution: str = "gaussian",
        seed: int = 0,
        p: float | None = None,
        num_classes: int | None = None,
        rank: int | None = None,
        noise: LabelNoise | None = None,
    ) -> None:
        if noise is None and noise_std is None and distribution != "flip":
            raise TypeError(
                "LabelNoiseSGD needs noise_std=... (0 gives plain SGD), distribution='flip' with p= and "
                "num_classes=, or noise=LabelNoise(...)"
            )
        if noise is None:  # (the stream's arguments checked before SGD checks its own)
            noise = LabelNoise(noise_std, distribution, seed, p=p, num_classes=num_classes, rank=rank)
        else:
            _refuse_beside_noise(noise_std=noise_std, distribution=distribution, seed=seed, p=p,
                                 num_classes=num_classes, rank=rank)
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )
        add_label_noise(self, noise=noise)

    @property
    def label_noise(self) -> LabelNoise:
        """The optimizer's noise stream."""
        return self._label_noise  # type: ignore[attr-defined]

    def noisy_loss(self, criterion: nn.Module | Any) -> NoisyLoss:
        """``criterion`` with this optimizer's label noise on its target (see :func:`noisy_loss`)."""
        return noisy_loss(criterion, self.label_noise)

    def attach_output_noise(self, model: nn.Module) -> RemovableHandle:
        """Forward hook subtracting this optimizer's noise from ``model``'s training outputs."""
        return attach_output_noise(model, self.label_noise)
