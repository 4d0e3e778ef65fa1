"""Label noise: distributions, counter-based random streams, schedules and checkpointable state.

A draw is a pure function of ``(seed, rank, step, call, shape, dtype, device)``: the four
integers are mixed into one 64-bit key (SplitMix64) that seeds a fresh ``torch.Generator`` on
the target's device. Nothing depends on the global RNG or on how often noise was drawn before,
so resuming a run needs only the step counter, and distributed ranks never share a stream.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Union

import torch

__all__ = ["LabelNoise", "ADDITIVE_DISTRIBUTIONS", "DISTRIBUTIONS"]

ADDITIVE_DISTRIBUTIONS = ("gaussian", "rademacher", "uniform")
DISTRIBUTIONS = ADDITIVE_DISTRIBUTIONS + ("flip",)

StdSchedule = Union[float, Callable[[int], float]]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, rank: int, step: int, call: int) -> int:
    """The 64-bit generator seed of one draw: a hash chain over the four counters."""
    key = 0
    for part in (seed, rank, step, call):
        key = _splitmix64(key ^ (part & _MASK64))
    return key


def _check_std(std: float) -> float:
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"Invalid noise std: {std} (must be finite and >= 0)")
    return std


def _default_rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class LabelNoise:
    r"""Fresh, reproducible label noise for every optimizer step.

    Additive distributions perturb float targets, ``y + eps``, with each entry of ``eps``
    independent, mean 0 and standard deviation ``std``:

    * ``"gaussian"``: :math:`\epsilon \sim N(0, s^2)`;
    * ``"rademacher"``: :math:`\epsilon = \pm s` with probability 1/2 each;
    * ``"uniform"``: :math:`\epsilon \sim U(-\sqrt{3} s, \sqrt{3} s)`.

    ``"flip"`` perturbs integer class labels: with probability ``p`` a label is replaced by a
    class drawn uniformly from the ``num_classes - 1`` other classes.

    The stream: :meth:`sample` draws from key ``(seed, rank, step, call)`` where ``step`` counts
    completed optimizer steps (advanced by :meth:`advance`, which the optimizer integration
    calls after every step) and ``call`` counts draws within the current step (one per loss or
    forward-hook call, i.e. per micro-batch). :meth:`rewind` resets ``call`` so that a closure
    evaluated several times in one step (LBFGS, line search) sees the same noise each time.

    Args:
        std: standard deviation of additive noise, or a callable ``step -> std`` (a schedule,
            e.g. for annealing). Ignored for ``"flip"``.
        distribution: one of ``"gaussian"``, ``"rademacher"``, ``"uniform"``, ``"flip"``.
        seed: stream seed.
        p: flip probability in ``[0, 1]`` (``"flip"`` only).
        num_classes: number of classes, at least 2 (``"flip"`` only).
        rank: distributed rank mixed into the stream; ``None`` takes the
            ``torch.distributed`` rank when initialised, else 0.
        ignore_index: a class label that ``"flip"`` leaves untouched and does not check (as
            ``nn.CrossEntropyLoss`` ignores it): -100 by default.
        check_finite: refuse NaN/Inf targets (and flip labels out of range) without a host
            synchronisation: on the CPU it raises at once; on a GPU a failed check is a
            device-side assert that stops the run at its next synchronisation.

    Raises:
        ValueError: for a negative or non-finite ``std``, ``p`` outside ``[0, 1]``, an unknown
            distribution, or a missing/invalid ``num_classes``.

    Example:
        >>> noise = add_label_noise(optimizer, std=0.1, seed=0)  # advances after every step()
        >>> loss = nn.functional.mse_loss(model(x), noise.perturb(y))
        >>> LabelNoise(p=0.2, distribution="flip", num_classes=10)  # for class labels
    """

    def __init__(
        self,
        std: StdSchedule = 0.0,
        distribution: str = "gaussian",
        seed: int = 0,
        *,
        p: float | None = None,
        num_classes: int | None = None,
        rank: int | None = None,
        check_finite: bool = True,
        ignore_index: int = -100,
    ) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"Invalid noise distribution: {distribution!r} (choose one of {DISTRIBUTIONS})"
            )
        if distribution == "flip":
            if p is None or not (0.0 <= float(p) <= 1.0):  # also rejects NaN
                raise ValueError(f"Invalid flip probability p: {p} (must be in [0, 1])")
            if num_classes is None or int(num_classes) != num_classes or num_classes < 2:
                raise ValueError(f"Invalid num_classes: {num_classes} (flip needs an int >= 2)")
        else:
            if p is not None or num_classes is not None:
                raise ValueError(
                    f"p and num_classes are for distribution='flip', not {distribution!r}"
                )
            if not callable(std):
                std = _check_std(std)
        if int(seed) != seed:
            raise ValueError(f"Invalid seed: {seed} (must be an int)")
        self.std = std
        self.distribution = distribution
        self.seed = int(seed)
        self.p = None if p is None else float(p)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.rank = _default_rank() if rank is None else int(rank)
        self.check_finite = check_finite
        self.ignore_index = int(ignore_index)
        self.step = 0  # completed optimizer steps
        self.call = 0  # draws made within the current step
        self.last_noise: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        # samples noised in the current and the last completed step (the first dimension of each
        # draw, summed over micro-batches): the training batch size B the theory needs
        self.samples_this_step = 0
        self.samples_last_step = 0

    @property
    def is_additive(self) -> bool:
        return self.distribution != "flip"

    def current_std(self) -> float:
        """The standard deviation in force at the current step (schedules evaluated)."""
        if not self.is_additive:
            raise ValueError("distribution='flip' has no std; see LabelNoise.p")
        return _check_std(self.std(self.step) if callable(self.std) else self.std)

    # -- stream bookkeeping -------------------------------------------------------------------

    def advance(self) -> None:
        """Mark one optimizer step as completed: the next draws use fresh noise."""
        self.step += 1
        self.call = 0
        self.samples_last_step, self.samples_this_step = self.samples_this_step, 0

    def rewind(self) -> None:
        """Restart the current step's draws (a closure re-evaluated within one step)."""
        self.call = 0
        self.samples_this_step = 0

    def generator(self, device: torch.device | str, call: int | None = None) -> torch.Generator:
        """The generator on ``device``, seeded with this step's key for draw ``call``.

        One generator per device, re-seeded for every draw (building a CUDA generator costs host
        time at every step); a draw depends only on its key, never on earlier draws.
        """
        key = stream_key(self.seed, self.rank, self.step, self.call if call is None else call)
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(key)

    # -- drawing ------------------------------------------------------------------------------

    def sample(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh noise for the current step and call, shaped, typed and placed like ``like``.

        Additive distributions return ``eps`` (float, mean 0, std :meth:`current_std`). For
        ``"flip"`` it returns an integer class offset: 0 (kept, probability ``1 - p``) or uniform
        in ``1 .. num_classes - 1``, so that ``(y + offset) % num_classes`` is the flipped label.
        Each call advances the within-step call counter.
        """
        if not isinstance(like, torch.Tensor):
            raise TypeError(f"LabelNoise.sample expects a tensor, got {type(like).__name__}")
        if self.is_additive:
            if not like.is_floating_point():
                raise TypeError(
                    f"distribution={self.distribution!r} adds noise to float targets, got dtype "
                    f"{like.dtype}; for integer class labels use distribution='flip'"
                )
            noise = self._draw_additive(like)
        else:
            if like.is_floating_point() or like.is_complex() or like.dtype == torch.bool:
                raise TypeError(
                    f"distribution='flip' needs integer class labels, got dtype {like.dtype}; "
                    "for float targets use an additive distribution"
                )
            noise = self._draw_flip(like)
        self.call += 1
        self.samples_this_step += like.shape[0] if like.dim() else 1
        self.last_noise = noise
        return noise

    def _draw_additive(self, like: torch.Tensor) -> torch.Tensor:
        std = self.current_std()
        if std == 0.0:
            return torch.zeros_like(like)
        g = self.generator(like.device)
        kw: dict[str, Any] = dict(generator=g, dtype=like.dtype, device=like.device)
        if self.distribution == "gaussian":
            return torch.randn(like.shape, **kw).mul_(std)
        if self.distribution == "rademacher":
            bits = torch.randint(0, 2, like.shape, **kw)
            return bits.mul_(2 * std).sub_(std)
        # uniform on [-sqrt(3) s, sqrt(3) s) has variance s^2
        half_width = math.sqrt(3.0) * std
        return torch.rand(like.shape, **kw).mul_(2 * half_width).sub_(half_width)

    def _draw_flip(self, like: torch.Tensor) -> torch.Tensor:
        assert self.p is not None and self.num_classes is not None
        g = self.generator(like.device)
        flip = torch.rand(like.shape, generator=g, device=like.device) < self.p
        offset = torch.randint(
            1, self.num_classes, like.shape, generator=g, device=like.device, dtype=like.dtype
        )
        return offset * flip

    def perturb(self, targets: torch.Tensor) -> torch.Tensor:
        """Noisy targets for the current step: ``targets + eps``, or flipped class labels.

        Raises:
            TypeError: non-tensor targets, or a dtype that does not fit the distribution.
            ValueError: NaN/Inf float targets, or class labels outside ``[0, num_classes)``
                (when ``check_finite``).
        """
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if self.check_finite:
            self._check_targets(targets)
        noise = self.sample(targets)
        if self.is_additive:
            return targets + noise
        flipped = torch.remainder(targets + noise, self.num_classes)
        return torch.where(targets == self.ignore_index, targets, flipped)  # ignored labels stay

    def _check_targets(self, targets: torch.Tensor) -> None:
        """NaN/Inf float targets or class labels out of range, checked without a host sync:
        on a GPU a failed check stops the run at its next synchronisation (a device-side assert);
        on the CPU it raises here, with the offending values."""
        if targets.is_floating_point():
            ok = (targets - targets == 0).all()  # x - x is 0 for finite x, NaN otherwise: 3 ops
        elif not self.is_additive and targets.numel() > 0:
            ok = ((targets >= 0) & (targets < self.num_classes) | (targets == self.ignore_index)).all()
        else:
            return
        try:
            torch._assert_async(ok, "label noise: targets contain NaN/Inf or class labels out of range")
        except RuntimeError:  # raised at once where the check runs on the host
            if targets.is_floating_point():
                bad = targets[~torch.isfinite(targets)].flatten()[:3].tolist()
                raise ValueError(f"targets contain NaN or Inf values, e.g. {bad}") from None
            labels = targets[targets != self.ignore_index]
            low, high = int(labels.min()), int(labels.max())
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}) (or be ignore_index={self.ignore_index}), "
                f"got range [{low}, {high}]"
            ) from None

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The stream position and configuration (plain Python values; ``weights_only``-safe).

        A ``std`` schedule is code, not state: re-create it when constructing the object that
        loads this state.
        """
        return {
            "step": self.step,
            "call": self.call,
            "seed": self.seed,
            "rank": self.rank,
            "distribution": self.distribution,
            "std": None if callable(self.std) else self.std,
            "p": self.p,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream position; configuration must match the saved one."""
        missing = {"step", "call", "seed", "distribution"} - set(state_dict)
        if missing:
            raise KeyError(f"LabelNoise state_dict is missing {sorted(missing)}")
        for name in ("seed", "distribution", "p", "num_classes"):
            if name in state_dict and state_dict[name] != getattr(self, name):
                raise ValueError(
                    f"LabelNoise state_dict has {name}={state_dict[name]!r} but this object has "
                    f"{name}={getattr(self, name)!r}; construct it with the saved configuration"
                )
        saved_std = state_dict.get("std")
        if saved_std is not None and not callable(self.std) and self.is_additive and saved_std != self.std:
            warnings.warn(
                f"LabelNoise: the checkpoint was trained with std={saved_std}, this stream has "
                f"std={self.std}; the run continues with {self.std}",
                stacklevel=2,
            )
        step, call = int(state_dict["step"]), int(state_dict["call"])
        if step < 0 or call < 0:
            raise ValueError(f"Invalid LabelNoise position: step={step}, call={call}")
        self.step, self.call = step, call

    def __repr__(self) -> str:
        if self.is_additive:
            std = "schedule" if callable(self.std) else self.std
            what = f"std={std}, distribution={self.distribution!r}"
        else:
            what = f"p={self.p}, num_classes={self.num_classes}, distribution='flip'"
        return f"LabelNoise({what}, seed={self.seed}, rank={self.rank}, step={self.step})"
