"""The contract every weighting method fulfils, and the declaration of its hyperparameters.

A method is a small function of T numbers: from the task losses (and, when it asks for them,
the Gramian ``G = J J^T`` of the per-task gradients of the shared parameters) it returns task
weights. Everything costly, the per-task gradients and the write-back of the combined gradient,
lives in :mod:`methods.engine`; method modules never call ``backward`` themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Need(str, Enum):
    """What a method needs from the gradient engine at each step."""

    NOTHING = "nothing"  # a function of the losses only: the engine back-propagates sum_t w_t L_t
    GRAMIAN = "gramian"  # G = J J^T, T x T, of the per-task gradients of the shared parameters


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method: its type, default and valid values.

    The CLI, the run-spec validation and the tuning search space all read this declaration.
    ``kind`` is ``float``, ``int``, ``str``, ``bool`` or ``tuple`` (a sequence of floats, one per
    task; such values are data-dependent and never tuned). ``low``/``high`` bound numbers
    (inclusive), ``choices`` enumerates the allowed values, ``log`` asks tuning for a log scale.
    """

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False
    tunable: bool = True

    def describe(self) -> str:
        """The valid values in words, for error messages and ``bench list``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is tuple:
            return "a sequence of floats, one per task"
        if self.kind is bool:
            return "true or false"
        if self.low is not None and self.high is not None:
            return f"a {self.kind.__name__} in [{self.low}, {self.high}]"
        return f"a {self.kind.__name__}"

    def validate(self, value: Any, method: str) -> Any:
        """Coerce ``value`` (possibly a string from a command line) and check it is valid."""
        where = f"{method}.{self.name}"
        try:
            value = self._coerce(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} is invalid: expected {self.describe()}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where}={value!r} is invalid: expected {self.describe()}")
        if self.kind in (int, float):
            if not math.isfinite(value):
                raise ValueError(f"{where}={value!r} is invalid: expected {self.describe()}")
            if (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high
            ):
                raise ValueError(f"{where}={value!r} is out of range: expected {self.describe()}")
        return value

    def _coerce(self, value: Any) -> Any:
        if value is None and self.default is None:
            return None
        if self.kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise TypeError(value)
        if self.kind is int:
            if isinstance(value, bool):
                raise TypeError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if self.kind is float:
            if isinstance(value, bool):
                raise TypeError(value)
            return float(value)
        if self.kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(";", ",").split(",") if v.strip()]
            if isinstance(value, Tensor):
                value = value.tolist()
            return tuple(float(v) for v in value)
        if not isinstance(value, str):
            raise TypeError(value)
        return value


@dataclass(frozen=True)
class EpochStats:
    """What a training loop reports to a method at the end of each epoch.

    ``train_loss``: mean training loss per task over the epoch's steps, shape [T].
    ``train_accuracy``: per-task training accuracy accumulated over the epoch, shape [T], for
    methods driven by accuracy (DeepChest); ``None`` when the task suite has no accuracy.
    """

    train_loss: Tensor
    train_accuracy: Tensor | None = None

    @classmethod
    def coerce(cls, stats: EpochStats | Mapping[str, Any]) -> EpochStats:
        if isinstance(stats, EpochStats):
            return stats
        unknown = set(stats) - {"train_loss", "train_accuracy"}
        if unknown:
            raise ValueError(
                f"unknown epoch statistics {sorted(unknown)}: expected train_loss and, "
                "for accuracy-driven methods, train_accuracy"
            )
        if "train_loss" not in stats:
            raise ValueError("epoch statistics need 'train_loss' (mean loss per task)")
        accuracy = stats.get("train_accuracy")
        return cls(
            train_loss=torch.as_tensor(stats["train_loss"], dtype=torch.float32),
            train_accuracy=None
            if accuracy is None
            else torch.as_tensor(accuracy, dtype=torch.float32),
        )


@dataclass
class Weighting:
    """A method's answer for one step.

    ``weights``: shape [T]. Under ``Need.NOTHING`` the engine back-propagates
    ``sum_t weights_t L_t + extra_loss``, so weights may depend on the method's parameters
    (UW). Under ``Need.GRAMIAN`` they are the coefficients of the shared gradient,
    ``g = sum_t weights_t g_t``, and ``extra_loss`` (if any) is back-propagated on its own to
    train the method's parameters (GradNorm).
    """

    weights: Tensor
    extra_loss: Tensor | None = None


class Method(nn.Module):
    """Base class of the native weighting methods.

    Subclasses set ``name`` and ``hparams`` and implement :meth:`weigh`; methods with epoch-level
    state also implement :meth:`epoch_end`. Hyperparameter values are validated against
    ``hparams`` and stored as attributes of the same name.
    """

    name: ClassVar[str]
    hparams: ClassVar[tuple[HParam, ...]] = ()

    def __init__(self, n_tasks: int, **hparams: Any) -> None:
        super().__init__()
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 2:
            raise ValueError(f"{self.name}: n_tasks must be an integer >= 2, got {n_tasks!r}")
        self.n_tasks = n_tasks
        self.hparam_values = resolve_hparams(self.name, self.hparams, hparams)
        for key, value in self.hparam_values.items():
            setattr(self, key, value)

    @property
    def needs(self) -> Need:
        """What this method needs from the engine at the next step."""
        return Need.NOTHING

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        """Task weights for one step from the detached-or-live losses [T] and the Gramian."""
        raise NotImplementedError(f"{type(self).__name__} must implement weigh()")

    def epoch_end(self, stats: EpochStats | Mapping[str, Any]) -> None:
        """Called once after each training epoch; stateless methods ignore it."""
        EpochStats.coerce(stats)

    def backward(
        self,
        losses: Tensor,
        shared_params: Sequence[Tensor] | Iterator[Tensor],
        *,
        features: Tensor | None = None,
        check_finite: bool = True,
        timer: Any = None,
    ) -> Tensor:
        """Back-propagate ``losses`` [T] as this method prescribes; return the weights used.

        After the call, the ``.grad`` of every shared parameter has received the method's
        combined gradient (added to what it held, as autograd does) and every other parameter
        reached by the losses the gradient the method prescribes. ``features`` (the shared
        representation) switches gradient methods to the feature-level Gramian;
        ``check_finite=False`` skips the NaN check (see :func:`methods.engine.backward`).
        ``timer``, if given, is a callable ``timer(phase)`` returning a context manager; phases
        are ``"gradients"`` and ``"weighting"``.
        """
        from methods.engine import backward

        return backward(self, losses, shared_params, features=features, check_finite=check_finite, timer=timer)

    def extra_repr(self) -> str:
        values = ", ".join(f"{k}={v!r}" for k, v in self.hparam_values.items())
        return f"n_tasks={self.n_tasks}" + (f", {values}" if values else "")


def resolve_hparams(
    method: str, declared: Sequence[HParam], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults overridden by ``given``, every value validated; unknown names are an error."""
    by_name = {h.name: h for h in declared}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        valid = ", ".join(f"{h.name} ({h.describe()}, default {h.default!r})" for h in declared)
        raise ValueError(
            f"{method} has no hyperparameter {', '.join(unknown)}; "
            + (f"valid: {valid}" if declared else "it takes none")
        )
    return {h.name: h.validate(given.get(h.name, h.default), method) for h in declared}
