"""Label noise: distributions, counter-based random streams, schedules and checkpointable state.

A draw is a pure function of ``(seed, rank, step, call, shape, dtype, device)``: the four
integers are mixed into one 64-bit key (a SplitMix64 chain), and the draw depends on all 64 bits.
torch's CPU generator keeps only the low 32 bits of a seed, so the key is split into two 32-bit
words, each seeding the generator for one uniform integer draw, and the two are combined by XOR:
different keys give independent draws, on every device. Nothing depends on the global RNG or on
how often noise was drawn before, so resuming a run needs only the step counter, and distributed
ranks never share a stream.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Union

import torch

from .arguments import is_int, is_real

__all__ = ["LabelNoise", "ADDITIVE_DISTRIBUTIONS", "DISTRIBUTIONS", "STREAM_VERSION"]

ADDITIVE_DISTRIBUTIONS = ("gaussian", "rademacher", "uniform")
DISTRIBUTIONS = ADDITIVE_DISTRIBUTIONS + ("flip",)

# 1: one generator seeded with the 64-bit key (the CPU's kept 32 bits of it); 2: both words used
STREAM_VERSION = 2

StdSchedule = Union[float, Callable[[int], float]]

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_BITS = 52  # uniform integers in [0, 2^52): (2k + 1) / 2^53 is an exact float64 strictly inside (0, 1)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, rank: int, step: int, call: int) -> int:
    """The 64-bit key of one draw: a hash chain over the four counters (each in [0, 2^64))."""
    key = 0
    for part in (seed, rank, step, call):
        key = _splitmix64(key ^ part)
    return key


def uniform_bits(generator: torch.Generator, key: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Independent uniform integers in [0, 2^52) of ``shape`` (int64), a function of all 64 bits of ``key``.

    The low word seeds the first draw, the high word the second, of which the second block is
    taken: a key with its words swapped then combines other values (a plain XOR of two
    same-position draws would repeat it), and keys differing in either word give independent bits.
    """
    generator.manual_seed(key & _MASK32)
    low = torch.randint(0, 1 << _BITS, shape, generator=generator, device=device)
    generator.manual_seed(key >> 32)
    high = torch.randint(0, 1 << _BITS, (2, *shape), generator=generator, device=device)[1]
    return low.bitwise_xor_(high)


def symmetric_unit(bits: torch.Tensor) -> torch.Tensor:
    """(2k + 1) / 2^52 - 1 for k in [0, 2^52): float64 uniform strictly inside (-1, 1), exact."""
    return bits.double().mul_(2.0 ** (1 - _BITS)).add_(2.0 ** -_BITS - 1)


def check_counter(name: str, value: object, *, optional: bool = False) -> int | None:
    """A seed, rank, step or call: an int in [0, 2^64) (the stream key mixes 64 bits of each)."""
    if optional and value is None:
        return None
    if not is_int(value) or not 0 <= value <= _MASK64:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int in [0, 2**64))")
    return int(value)


def _check_std(std: object, step: int | None = None) -> float:
    where = "" if step is None else f" (the schedule's value at step {step})"
    if not is_real(std):
        raise TypeError(f"Invalid noise std{where}: {std!r} (must be a real number >= 0, or a callable step -> std)")
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"Invalid noise std{where}: {std} (must be finite and >= 0)")
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
        std: standard deviation of additive noise (a real number >= 0; default 0), or a
            callable ``step -> std`` (a schedule, e.g. for annealing). Not for ``"flip"``.
        distribution: one of ``"gaussian"``, ``"rademacher"``, ``"uniform"``, ``"flip"``.
        seed: stream seed, an int in ``[0, 2**64)``.
        p: flip probability in ``[0, 1]`` (``"flip"`` only).
        num_classes: number of classes, an int >= 2 (``"flip"`` only).
        rank: distributed rank mixed into the stream, an int in ``[0, 2**64)``; ``None`` takes
            the ``torch.distributed`` rank when initialised, else 0.
        ignore_index: a class label that ``"flip"`` leaves untouched and does not check (as
            ``nn.CrossEntropyLoss`` ignores it): -100 by default.
        check_finite: refuse NaN/Inf targets (and flip labels out of range) without a host
            synchronisation: on the CPU it raises at once; on a GPU a failed check is a
            device-side assert that stops the run at its next synchronisation.

    A stream advances with one optimizer: :func:`~noisy_label_sgd.add_label_noise` refuses a
    LabelNoise that another optimizer already advances (it would advance twice per step).

    Raises:
        TypeError: a ``std`` that is neither a real number nor a callable; a seed, rank, p,
            num_classes or ignore_index of the wrong type.
        ValueError: a negative or non-finite ``std``, ``p`` outside ``[0, 1]``, an unknown
            distribution, a seed or rank outside ``[0, 2**64)``, ``num_classes`` < 2, or an option
            of the other kind of distribution (``std`` for ``"flip"``, ``p``/``num_classes``
            for additive noise).

    Example:
        >>> noise = add_label_noise(optimizer, std=0.1, seed=0)  # advances after every step()
        >>> loss = nn.functional.mse_loss(model(x), noise.perturb(y))
        >>> LabelNoise(p=0.2, distribution="flip", num_classes=10)  # for class labels
    """

    def __init__(
        self,
        std: StdSchedule | None = None,
        distribution: str = "gaussian",
        seed: int = 0,
        *,
        p: float | None = None,
        num_classes: int | None = None,
        rank: int | None = None,
        check_finite: bool = True,
        ignore_index: int = -100,
    ) -> None:
        if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"Invalid noise distribution: {distribution!r} (choose one of {DISTRIBUTIONS})"
            )
        if distribution == "flip":
            if std is not None:
                raise ValueError(
                    f"std={std!r} is for additive noise; distribution='flip' takes p= (the flip "
                    "probability) and num_classes="
                )
            if p is None or not is_real(p) or not (0.0 <= float(p) <= 1.0):  # also rejects NaN
                raise ValueError(f"Invalid flip probability p: {p!r} (must be a real number in [0, 1])")
            if not is_int(num_classes) or num_classes < 2:
                raise ValueError(f"Invalid num_classes: {num_classes!r} (flip needs an int >= 2)")
        else:
            if p is not None or num_classes is not None:
                raise ValueError(
                    f"p and num_classes are for distribution='flip', not {distribution!r}"
                )
            std = 0.0 if std is None else std if callable(std) else _check_std(std)
        if not is_int(ignore_index):
            raise TypeError(f"Invalid ignore_index: {ignore_index!r} (must be an int)")
        if not isinstance(check_finite, bool):
            raise TypeError(f"Invalid check_finite: {check_finite!r} (must be a bool)")
        self.std = std
        self.distribution = distribution
        self.seed = check_counter("seed", seed)
        self.p = None if p is None else float(p)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.rank = _default_rank() if rank is None else check_counter("rank", rank)
        self.check_finite = check_finite
        self.ignore_index = int(ignore_index)
        self.step = 0  # completed optimizer steps
        self.call = 0  # draws made within the current step
        self.last_noise: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._optimizer: weakref.ref | None = None  # the optimizer that advances this stream
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
        if callable(self.std):
            return _check_std(self.std(self.step), self.step)
        return self.std

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

    def key(self, call: int | None = None) -> int:
        """The 64-bit key of this step's draw ``call`` (the current one by default)."""
        return stream_key(self.seed, self.rank, self.step, self.call if call is None else call)

    def bits(self, shape: torch.Size | tuple[int, ...], device: torch.device, call: int | None = None) -> torch.Tensor:
        """Uniform int64 bits in [0, 2^52) of ``shape`` on ``device``, for this step's draw ``call``.

        One generator per device, re-seeded for every draw (building a CUDA generator costs host
        time at every step); a draw depends only on its key, never on earlier draws.
        """
        if device.type == "meta":
            raise ValueError("label noise cannot be drawn on the meta device (tensors without data); "
                             "draw it where the targets live")
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return uniform_bits(self._generators[device], self.key(call), torch.Size(shape), device)

    # -- drawing ------------------------------------------------------------------------------

    def sample(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh noise for the current step and call, shaped, typed and placed like ``like``.

        Additive distributions return ``eps`` (float, mean 0, std :meth:`current_std`). For
        ``"flip"`` it returns an integer class offset in ``like``'s dtype: 0 (kept, probability
        ``1 - p``) or uniform in ``1 .. num_classes - 1``, so that ``(y + offset) % num_classes``
        (in int64) is the flipped label. Each call advances the within-step call counter.
        """
        noise = self._next(like)
        return noise if self.is_additive else noise.to(like.dtype)

    def _next(self, like: torch.Tensor) -> torch.Tensor:
        """The current draw (flip offsets in int64), then the call counter advanced."""
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
            largest = torch.iinfo(like.dtype).max
            if self.num_classes - 1 > largest:
                raise ValueError(
                    f"class labels of dtype {like.dtype} hold at most {largest + 1} classes, not "
                    f"num_classes={self.num_classes}; pass int64 labels"
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
        unit = symmetric_unit(self.bits(like.shape, like.device))  # uniform in (-1, 1), float64
        if self.distribution == "gaussian":  # inverse CDF: sqrt(2) erfinv(2u - 1) ~ N(0, 1)
            noise = torch.erfinv(unit).mul_(math.sqrt(2.0) * std)
        elif self.distribution == "rademacher":
            noise = unit.sign_().mul_(std)
        else:  # uniform on (-sqrt(3) s, sqrt(3) s) has variance s^2
            noise = unit.mul_(math.sqrt(3.0) * std)
        return noise.to(like.dtype)

    def _draw_flip(self, like: torch.Tensor) -> torch.Tensor:
        """int64 offsets: 0 with probability 1 - p, else uniform in 1 .. num_classes - 1 (the
        remainder of 52 uniform bits: a bias below num_classes / 2^52)."""
        assert self.p is not None and self.num_classes is not None
        bits = self.bits((2, *like.shape), like.device)
        flip = bits[0].double().mul_(2.0 ** -_BITS) < self.p
        return bits[1].remainder_(self.num_classes - 1).add_(1).mul_(flip)

    def perturb(self, targets: torch.Tensor) -> torch.Tensor:
        """Noisy targets for the current step: ``targets + eps``, or flipped class labels
        (computed in int64 whatever the labels' dtype, returned in it).

        Raises:
            TypeError: non-tensor targets, or a dtype that does not fit the distribution.
            ValueError: NaN/Inf float targets, or class labels outside ``[0, num_classes)``
                (when ``check_finite``); labels on the meta device.
        """
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if self.check_finite:
            self._check_targets(targets)
        noise = self._next(targets)
        if self.is_additive:
            return targets + noise
        labels = targets.long()
        flipped = torch.remainder(labels + noise, self.num_classes).to(targets.dtype)
        return torch.where(labels == self.ignore_index, targets, flipped)  # ignored labels stay

    def _check_targets(self, targets: torch.Tensor) -> None:
        """NaN/Inf float targets or class labels out of range, checked without a host sync:
        on a GPU a failed check stops the run at its next synchronisation (a device-side assert);
        on the CPU it raises here, with the offending values."""
        if targets.device.type == "meta":
            return  # (refused with its own message by the draw)
        if targets.is_floating_point():
            ok = (targets - targets == 0).all()  # x - x is 0 for finite x, NaN otherwise: 3 ops
        elif not self.is_additive and targets.numel() > 0 and targets.dtype != torch.bool:
            labels = targets.long()  # (compared in int64: num_classes may not fit the labels' dtype)
            ok = ((labels >= 0) & (labels < self.num_classes) | (labels == self.ignore_index)).all()
        else:
            return
        try:
            torch._assert_async(ok, "label noise: targets contain NaN/Inf or class labels out of range")
        except RuntimeError:  # raised at once where the check runs on the host
            if targets.is_floating_point():
                bad = targets[~torch.isfinite(targets)].flatten()[:3].tolist()
                raise ValueError(f"targets contain NaN or Inf values, e.g. {bad}") from None
            labels = labels[labels != self.ignore_index]
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
            "stream": STREAM_VERSION,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream position; configuration must match the saved one.

        A state saved before version 2 of the stream (``"stream"`` missing) resumes at its step
        with the current stream, whose draws differ from the old one's: a warning says so.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"LabelNoise state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"step", "call", "seed", "distribution"} - set(state_dict)
        if missing:
            raise KeyError(f"LabelNoise state_dict is missing {sorted(missing)}")
        for name in ("seed", "distribution", "p", "num_classes"):
            if name in state_dict and state_dict[name] != getattr(self, name):
                raise ValueError(
                    f"LabelNoise state_dict has {name}={state_dict[name]!r} but this object has "
                    f"{name}={getattr(self, name)!r}; construct it with the saved configuration"
                )
        step = check_counter("LabelNoise state_dict step", state_dict["step"])
        call = check_counter("LabelNoise state_dict call", state_dict["call"])
        stream = state_dict.get("stream", 1)
        if stream != STREAM_VERSION:
            warnings.warn(
                f"LabelNoise: the checkpoint's noise came from stream version {stream}; the run resumes at "
                f"step {step} with version {STREAM_VERSION}, whose draws differ (every guarantee holds from here)",
                stacklevel=2,
            )
        saved_std = state_dict.get("std")
        if saved_std is not None and not callable(self.std) and self.is_additive and saved_std != self.std:
            warnings.warn(
                f"LabelNoise: the checkpoint was trained with std={saved_std}, this stream has "
                f"std={self.std}; the run continues with {self.std}",
                stacklevel=2,
            )
        self.step, self.call = step, call

    def __repr__(self) -> str:
        if self.is_additive:
            std = "schedule" if callable(self.std) else self.std
            what = f"std={std}, distribution={self.distribution!r}"
        else:
            what = f"p={self.p}, num_classes={self.num_classes}, distribution='flip'"
        return f"LabelNoise({what}, seed={self.seed}, rank={self.rank}, step={self.step})"
