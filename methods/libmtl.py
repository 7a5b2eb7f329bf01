"""LibMTL 1.1.5's own weighting classes behind this package's interface, as a reference.

``methods.create("libmtl:mgda", n_tasks=3)`` runs LibMTL's ``MGDA.backward`` itself on the
same model and losses as the native method, so the two can be compared side by side. LibMTL's
classes are mixins that expect a trainer to provide ``task_num``, ``device``, ``rep_grad``,
``get_share_params()`` and friends; :class:`_Host` provides them, nothing of LibMTL's code is
copied.

Compatibility and guards for known defects of the 1.1.5 release (fixed on LibMTL's main
branch, never released):

- ``import LibMTL`` imports ``torchvision.models.utils``, removed in torchvision 0.13. A
  module of that name exposing ``torch.hub.load_state_dict_from_url`` (what LibMTL wants from
  it) is registered before the import when torchvision lacks it.
- CAGrad hard-codes three tasks (``reshape(1, 3)``): other task counts are refused.
- MGDA's solver loop never increments its counter, so an input that needs more than 250
  iterations loops forever: each call first runs the native solver (same algorithm, bounded)
  and refuses when it does not converge within 250 iterations.
- PCGrad divides by a zero gradient norm: a task with an all-zero gradient is refused.
- LibMTL assumes ``zero_grad(set_to_none=False)`` (it writes ``param.grad.data``) and
  overwrites the shared gradients: the shared ``.grad`` are set to zeros before the call and
  what they held before is added back after, so accumulation behaves as for native methods.

Returned weights are LibMTL's own return values: for MGDA the min-norm coefficients of the
normalised gradients, for CAGrad the simplex point w (native methods return the coefficients of
the raw gradients instead; see their modules). ``libmtl:pcgrad`` draws its task order from
Python's global ``random`` module, as LibMTL does. LibMTL's ``backward`` does gradient work and
weighting in one call: a timer sees it all as the ``"gradients"`` phase.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from methods import cagrad, ew, gradnorm, mgda, pcgrad, uw
from methods.base import EpochStats, HParam, Method
from methods.engine import PhaseTimer, check_device, checked_losses, checked_params
from methods.mgda import MAX_ITERATIONS, min_norm_weights

# name -> (LibMTL class name, native counterpart, {native hyperparameter: LibMTL kwarg})
LIBMTL_METHODS: dict[str, tuple[str, type[Method], dict[str, str]]] = {
    "ew": ("EW", ew.EW, {}),
    "uw": ("UW", uw.UW, {}),
    "gradnorm": ("GradNorm", gradnorm.GradNorm, {"alpha": "alpha"}),
    "mgda": ("MGDA", mgda.MGDA, {"normalization": "mgda_gn"}),
    "pcgrad": ("PCGrad", pcgrad.PCGrad, {}),
    "cagrad": ("CAGrad", cagrad.CAGrad, {"calpha": "calpha", "rescale": "rescale"}),
}


class LibMTLDefectError(RuntimeError):
    """An input on which LibMTL 1.1.5 is known to fail (hang, crash or compute NaN)."""


def import_libmtl_weighting() -> types.ModuleType:
    """``LibMTL.weighting``, importable on current torchvision (see the module docstring)."""
    try:
        import torchvision.models.utils  # noqa: F401
    except ModuleNotFoundError:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = shim
    try:
        import LibMTL.weighting as weighting
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "libmtl:<method> needs LibMTL 1.1.5: pip install libmtl==1.1.5"
        ) from None
    return weighting


def _host_class(libmtl_class: type, short_name: str) -> type:
    """A subclass of LibMTL's weighting class that supplies what its trainer would."""

    class _Host(libmtl_class):  # type: ignore[misc, valid-type]
        def __init__(self, n_tasks: int) -> None:
            super().__init__()
            self.task_num = n_tasks
            self.task_name = [f"task{t}" for t in range(n_tasks)]
            self.device = torch.device("cpu")
            self.rep_grad = False
            self.epoch = 0
            self.train_loss_buffer = np.zeros((n_tasks, 1))
            self.shared_params: list[Tensor] = []
            self.init_param()

        def get_share_params(self) -> list[Tensor]:
            return self.shared_params

        def zero_grad_share_params(self) -> None:
            for p in self.shared_params:
                p.grad = torch.zeros_like(p)

        def _compute_grad(self, losses: Tensor, mode: str, rep_grad: bool = False) -> Tensor:
            grads = super()._compute_grad(losses, mode, rep_grad)
            if short_name == "pcgrad":
                zero = torch.nonzero(grads.norm(dim=1) == 0).flatten().tolist()
                if zero:
                    raise LibMTLDefectError(
                        f"libmtl:pcgrad: task(s) {zero} have an all-zero gradient, on which "
                        "LibMTL 1.1.5's PCGrad divides by zero; use the native pcgrad"
                    )
            return grads

        def _find_min_norm_element(self, grads: Tensor) -> Tensor:
            _, _, converged = min_norm_weights(grads @ grads.T)
            if not converged:
                raise LibMTLDefectError(
                    f"libmtl:mgda: this input needs more than {MAX_ITERATIONS} solver "
                    "iterations, and LibMTL 1.1.5's MGDA loop never counts its iterations, so "
                    "it would never stop; use the native mgda"
                )
            return super()._find_min_norm_element(grads)

    _Host.__name__ = f"LibMTL{libmtl_class.__name__}Host"
    return _Host


class LibMTLMethod(Method):
    """Base of the ``libmtl:<name>`` wrappers; subclasses are made by :func:`libmtl_class`."""

    short_name: ClassVar[str]
    libmtl_kwargs: ClassVar[dict[str, str]]

    def __init__(self, n_tasks: int, **hparams: Any) -> None:
        super().__init__(n_tasks, **hparams)
        if self.short_name == "cagrad" and n_tasks != 3:
            raise LibMTLDefectError(
                f"libmtl:cagrad: LibMTL 1.1.5's CAGrad hard-codes 3 tasks (reshape(1, 3)); "
                f"got {n_tasks}. Use the native cagrad for other task counts"
            )
        class_name = LIBMTL_METHODS[self.short_name][0]
        libmtl_class_ = getattr(import_libmtl_weighting(), class_name)
        self.host = _host_class(libmtl_class_, self.short_name)(n_tasks)
        self.register_buffer("first_epoch_loss_sum", torch.zeros(n_tasks))
        self.first_epoch_steps = 0

    def backward(
        self,
        losses: Tensor | Sequence[Tensor],
        shared_params: Iterable[Tensor],
        *,
        features: Tensor | None = None,
        check_finite: bool = True,
        timer: PhaseTimer | None = None,
    ) -> Tensor:
        if features is not None:
            raise ValueError(
                f"{self.name} runs LibMTL's parameter-level gradients only; the feature-level mode "
                "(--grad-level features) is for native methods"
            )
        losses = checked_losses(self, losses, check_finite=check_finite)
        shared = checked_params(shared_params)
        check_device(self, losses)
        if self.host.epoch == 0:
            self.first_epoch_loss_sum += losses.detach()
            self.first_epoch_steps += 1
        held = [p.grad for p in shared]
        self.host.shared_params = shared
        self.host.device = losses.device
        self.host.zero_grad_share_params()
        kwargs = {libmtl: self.hparam_values[ours] for ours, libmtl in self.libmtl_kwargs.items()}
        with (timer or (lambda phase: contextlib.nullcontext()))("gradients"):
            weights = self.host.backward(losses, **kwargs)
        for p, grad in zip(shared, held):
            if grad is not None:
                p.grad.add_(grad)
        return torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=losses.device)

    def epoch_end(self, stats: EpochStats | Mapping[str, Any]) -> None:
        EpochStats.coerce(stats)
        if self.host.epoch == 0 and self.first_epoch_steps:
            mean = (self.first_epoch_loss_sum / self.first_epoch_steps).cpu().numpy()
            self.host.train_loss_buffer[:, 0] = mean
        self.host.epoch += 1

    def get_extra_state(self) -> dict[str, Any]:
        """What LibMTL's classes and this wrapper keep outside tensors (saved in ``state_dict``)."""
        return {
            "epoch": self.host.epoch,
            "first_epoch_steps": self.first_epoch_steps,
            "train_loss_buffer": self.host.train_loss_buffer.tolist(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.host.epoch = state["epoch"]
        self.first_epoch_steps = state["first_epoch_steps"]
        self.host.train_loss_buffer = np.array(state["train_loss_buffer"])


def libmtl_class(short_name: str) -> type[Method]:
    """The ``libmtl:<short_name>`` wrapper class."""
    if short_name not in LIBMTL_METHODS:
        raise ValueError(
            f"unknown method 'libmtl:{short_name}'; LibMTL methods available: "
            + ", ".join(f"libmtl:{n}" for n in sorted(LIBMTL_METHODS))
        )
    _, native, kwargs = LIBMTL_METHODS[short_name]
    declared: tuple[HParam, ...] = tuple(h for h in native.hparams if h.name in kwargs)
    return type(
        f"LibMTL{native.__name__}",
        (LibMTLMethod,),
        {
            "name": f"libmtl:{short_name}",
            "short_name": short_name,
            "hparams": declared,
            "libmtl_kwargs": kwargs,
            "__doc__": f"LibMTL 1.1.5's {LIBMTL_METHODS[short_name][0]} behind this package's API.",
        },
    )
