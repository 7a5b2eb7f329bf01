"""Multi-task weighting methods behind one registry, applied by one gradient engine.

    import methods
    m = methods.create("cagrad", n_tasks=3, calpha=0.4)
    weights = m.backward(torch.stack([loss_a, loss_b, loss_c]), shared_params=encoder.parameters())
    optimizer.step()
    m.epoch_end({"train_loss": mean_losses, "train_accuracy": accuracies})
"""

from methods import cagrad, deepchest, ew, gradnorm, mgda, pcgrad, uw, uwo, uwso  # noqa: F401  (registration)
from methods.base import EpochStats, HParam, Method, Need, Weighting
from methods.engine import NonFiniteLossError, backward, task_jacobian
from methods.registry import available, create, hparams, method_class, register

__all__ = [
    "EpochStats",
    "HParam",
    "Method",
    "Need",
    "NonFiniteLossError",
    "Weighting",
    "available",
    "backward",
    "create",
    "hparams",
    "method_class",
    "register",
    "task_jacobian",
]
