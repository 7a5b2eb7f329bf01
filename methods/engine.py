"""The one gradient engine: computes what a method needs and applies its task weights.

For a method that needs nothing but the losses (EW, UW, UW-SO, UW-O, DeepChest, GradNorm's
first epoch) the engine back-propagates ``sum_t w_t L_t`` (plus the method's own extra loss)
once, so every parameter, shared or task-specific, receives the weighted gradient.

For a method that needs the Gramian (MGDA, PCGrad, CAGrad, GradNorm) the engine builds the
Jacobian ``J`` (T x D) of the task losses with respect to the D shared parameters, one row per
task, hands the method ``G = J J^T`` and writes ``g = sum_t w_t J_t`` into the shared
parameters' ``.grad``. Task-specific parameters receive their own task's gradient with weight 1,
as in LibMTL: they are accumulated by the same per-task backward passes that build ``J``.

Feature level (``features=z``, MGDA-UB of Sener & Koltun, NeurIPS 2018): the Gramian is
built from the gradients of the losses with respect to the shared representation ``z`` (the
encoder's output) instead of its parameters: ``J_z`` (T x numel(z)) costs one pass through the
small heads per task and one single pass through the encoder. Since ``g_t = J_z,t dz/dtheta``,
the shared gradient written is still ``sum_t w_t g_t``; only the weights come from
``G_z = J_z J_z^T``, an approximation of ``G``. One backward of
``[sum_t L_t, z]`` with gradients ``[1, (w - 1)^T J_z]`` gives the heads their own gradient with
weight 1 and the encoder ``(w^T J_z) dz/dtheta``, in one pass through the encoder.

Per-task gradients: a loop of one ``backward(retain_graph=True)`` per task, accumulating in
place into the rows of ``J`` (see :func:`task_jacobian`). Measured on a 2-core CPU (ResNet-18,
64 px, batch 16, 14 tasks) it was the fastest exact way: 1.8-2.0 s per step, against 2.9 s for
batched ``is_grads_batched`` vector-Jacobian products and 2.5 s for TorchJD's autogram Gramian
(DESIGN.md). The Gramian is then one ``J J^T`` (0.12 s), and the combination one ``w^T J``
(0.06 s). The same loop runs on a GPU; no GPU was available to measure the batched
alternatives there, and ``python -m bench profile --device cuda`` is the way to do so. On a
GPU nothing in the engine reads a value back to the host except the finiteness check that
``check_finite=False`` turns off; the solvers of MGDA, PCGrad and CAGrad read the T x T
Gramian on the host (their loops have data-dependent stopping and ordering).

Memory: ``J`` (T x D float32, 630 MB for ResNet-18's encoder at 14 tasks) is materialised; it
exists only inside :func:`backward` and is freed before it returns, so it is never alive
together with the optimizer step's buffers. Every Gramian method here needs ``J`` itself, not
only ``G``: the shared gradient written is ``w^T J``. At feature level ``J_z`` is T x numel(z)
(14 x 8,192 floats at batch 16) and the parameter Jacobian is never formed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from methods.base import Method, Need

PhaseTimer = Callable[[str], contextlib.AbstractContextManager[Any]]


class NonFiniteLossError(FloatingPointError):
    """A task loss is NaN or infinite; the step cannot be taken."""


def _no_timer(phase: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


def backward(
    method: Method,
    losses: Tensor | Sequence[Tensor],
    shared_params: Iterable[Tensor],
    *,
    features: Tensor | None = None,
    check_finite: bool = True,
    timer: PhaseTimer | None = None,
) -> Tensor:
    """Back-propagate ``losses`` as ``method`` prescribes and return the task weights [T].

    Weights are returned detached. For gradient methods they are the coefficients of the raw
    per-task gradients: the shared gradient written is exactly ``sum_t w_t g_t``. With
    ``features`` (the shared representation the heads read), gradient methods weigh from the
    feature-level Gramian (see the module docstring). ``check_finite=False`` skips the check
    for NaN or infinite losses, the one host-device synchronisation of a step; the caller then
    checks the losses later (the harness does so once per epoch on a GPU).
    """
    losses = checked_losses(method, losses, check_finite=check_finite)
    shared = checked_params(shared_params)
    check_device(method, losses)
    phase = timer or _no_timer

    if method.needs is Need.NOTHING:
        with phase("weighting"):
            result = method.weigh(losses, None)
        with phase("gradients"):
            objective = (result.weights * losses).sum()
            if result.extra_loss is not None:
                objective = objective + result.extra_loss
            objective.backward()
        return result.weights.detach()

    if features is not None and not features.requires_grad:
        raise ValueError("features must be the shared representation the losses were computed from (requires grad)")
    with phase("gradients"):
        jacobian = task_jacobian(losses, shared) if features is None else feature_jacobian(losses, features)
        gramian = jacobian @ jacobian.T
    with phase("weighting"):
        result = method.weigh(losses.detach(), gramian)
        weights = result.weights.detach().to(jacobian.dtype)
        if result.extra_loss is not None:
            result.extra_loss.backward()
    with phase("gradients"):
        if features is None:
            add_flat_gradient(shared, weights @ jacobian)
        else:  # heads: sum_t L_t (weight 1); encoder: (w^T J_z) dz/dtheta, in one pass
            correction = ((weights - 1.0) @ jacobian).view_as(features).to(features.dtype)
            torch.autograd.backward([losses.sum(), features], grad_tensors=[None, correction])
        del jacobian
    return weights


def feature_jacobian(losses: Tensor, features: Tensor) -> Tensor:
    """Rows ``d L_t / d features``, flattened, shape [T, numel(features)], float32.

    Each row costs a backward pass through the heads only; nothing is accumulated into
    ``.grad``. A loss that does not depend on ``features`` gets a zero row.
    """
    rows = []
    for t in range(losses.numel()):
        (grad,) = torch.autograd.grad(losses[t], features, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros(features.numel(), device=features.device) if grad is None else grad.reshape(-1))
    return torch.stack(rows).to(torch.float32)


def task_jacobian(losses: Tensor, shared: Sequence[Tensor]) -> Tensor:
    """Rows ``J_t = d L_t / d shared``, flattened and concatenated, shape [T, D], float32.

    Side effect, on purpose: each task's backward pass also accumulates that task's gradient
    (weight 1) into every non-shared parameter it reaches. The ``.grad`` the shared parameters
    held before the call is restored.

    The backward passes write straight into ``J``: before task ``t``'s pass, every shared
    parameter's ``.grad`` is set to a view of its slice of the zeroed row ``J_t``, and autograd
    accumulates the gradient into it in place. Copying each ``.grad`` into its row afterwards
    instead cost 0.17 s more per step (ResNet-18, 14 tasks, 2-core CPU: 1.76 s against 1.60 s
    for the 14 passes, 1.52 s with neither). A parameter a task does not reach keeps zeros.
    Hence the shared parameters must be float32.
    """
    wrong = sorted({str(p.dtype) for p in shared if p.dtype != torch.float32})
    if wrong:
        raise ValueError(
            f"gradient methods need float32 shared parameters (autograd writes into the float32 "
            f"Jacobian), got {', '.join(wrong)}; keep the model in float32 and use bf16 autocast "
            "of the forward pass (--amp) for reduced precision"
        )
    held = [p.grad for p in shared]
    jacobian = torch.zeros((losses.numel(), sum(p.numel() for p in shared)), dtype=torch.float32, device=losses.device)
    last = losses.numel() - 1
    for t in range(losses.numel()):
        for p, piece in zip(shared, _parameter_slices(jacobian[t], shared)):
            p.grad = piece
        losses[t].backward(retain_graph=t < last)
    for p, grad in zip(shared, held):
        p.grad = grad
    return jacobian


def add_flat_gradient(params: Sequence[Tensor], flat: Tensor) -> None:
    """Add the slices of the flat vector ``flat`` to each parameter's ``.grad``.

    A parameter without a gradient gets a view of ``flat`` as its ``.grad`` (no copy), so
    ``flat`` must not be written to afterwards.
    """
    for p, piece in zip(params, _parameter_slices(flat, params)):
        piece = piece.to(p.dtype)
        if p.grad is None:
            p.grad = piece
        else:
            p.grad.add_(piece)


def _parameter_slices(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive slices of the 1-D ``flat``, each viewed in the shape of its parameter."""
    pieces, offset = [], 0
    for p in params:
        pieces.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return pieces


def checked_losses(method: Method, losses: Tensor | Sequence[Tensor], check_finite: bool = True) -> Tensor:
    """``losses`` as a 1-D tensor of ``method.n_tasks`` losses that require grad, or a clear error.

    With ``check_finite`` a NaN or infinite loss raises :class:`NonFiniteLossError` (this reads
    the losses on the host: on a GPU, a synchronisation).
    """
    if not isinstance(losses, Tensor):
        losses = list(losses)
        for t, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"{method.name}: loss of task {t} must be a scalar tensor, got "
                    f"{getattr(loss, 'shape', type(loss).__name__)}; reduce each task's loss "
                    "to one number (e.g. .mean()) before stacking"
                )
        losses = torch.stack([loss.reshape(()) for loss in losses])
    if losses.dim() != 1:
        raise ValueError(
            f"{method.name}: losses must have shape [n_tasks] = [{method.n_tasks}], got "
            f"{tuple(losses.shape)}; pass torch.stack([loss_1, ..., loss_T]) of scalar losses"
        )
    if losses.numel() != method.n_tasks:
        raise ValueError(
            f"{method.name} was created for {method.n_tasks} tasks but got "
            f"{losses.numel()} losses"
        )
    if not losses.requires_grad:
        raise ValueError(
            f"{method.name}: the losses do not require grad; compute them from the model's "
            "output without torch.no_grad() or detach()"
        )
    if check_finite:
        check_finite_losses(method.name, losses)
    return losses


def check_finite_losses(name: str, losses: Tensor) -> None:
    """Raise :class:`NonFiniteLossError` naming the tasks whose loss is NaN or infinite."""
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = [
            f"task {t} = {losses[t].item()}" for t in torch.nonzero(~finite).flatten().tolist()
        ]
        raise NonFiniteLossError(
            f"{name}: non-finite loss ({', '.join(bad)}); lower the learning rate, "
            "check the inputs and labels of this batch, or clip gradients"
        )


def checked_params(shared_params: Iterable[Tensor]) -> list[Tensor]:
    """The shared parameters as a list without duplicates; each must require grad."""
    shared = list(shared_params)
    if not shared:
        raise ValueError("shared_params is empty: pass the shared encoder's parameters")
    unique: dict[int, Tensor] = {}
    for p in shared:
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(
                "shared_params must be tensors that require grad (e.g. encoder.parameters())"
            )
        unique.setdefault(id(p), p)
    return list(unique.values())


def check_device(method: Method, losses: Tensor) -> None:
    """The method's parameters and buffers must live on the losses' device."""
    for name, tensor in list(method.named_parameters()) + list(method.named_buffers()):
        if tensor.device != losses.device:
            raise ValueError(
                f"{method.name}.{name} is on {tensor.device} but the losses are on "
                f"{losses.device}; call method.to({str(losses.device)!r}) before creating "
                "the optimizer"
            )
