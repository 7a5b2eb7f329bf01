"""The feature-level gradient mode (MGDA-UB): weights from the Gramian of d L_t / d z.

References are computed independently: per-task gradients with ``torch.autograd.grad`` and
the methods' own T-dimensional solvers on the reference Gramian.
"""

from __future__ import annotations

import types

import pytest
import torch

import methods
from methods.mgda import min_norm_weights


def features_and_losses(mtl: types.SimpleNamespace, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    z = net.encoder(x)
    outputs = torch.cat([head(z) for head in net.heads], dim=1)
    return z, ((outputs - y) ** 2).mean(dim=0)


@pytest.mark.parametrize("name", ["mgda", "pcgrad", "cagrad", "gradnorm"])
def test_feature_level_weights_come_from_the_feature_gramian(mtl: types.SimpleNamespace, name: str) -> None:
    n_tasks = 3
    net = mtl.make_net(n_tasks)
    x, y = mtl.make_batch(n_tasks, seed=1)
    z, losses = features_and_losses(mtl, net, x, y)
    feature_rows = mtl.jacobian(losses, [z])  # d L_t / d z, flattened
    reference_gramian = feature_rows @ feature_rows.T
    shared = list(net.encoder.parameters())
    parameter_rows = mtl.jacobian(losses, shared)
    head_grads = [mtl.jacobian(losses[t : t + 1], net.heads[t].parameters())[0] for t in range(n_tasks)]

    method = methods.create(name, n_tasks, **({"seed": 0} if name == "pcgrad" else {}))
    twin = methods.create(name, n_tasks, **({"seed": 0} if name == "pcgrad" else {}))
    weights = method.backward(losses, shared, features=z)
    expected = twin.weigh(losses.detach(), reference_gramian).weights
    assert torch.allclose(weights, expected.to(weights.dtype), atol=1e-5)
    if name == "mgda":
        solved, _, _ = min_norm_weights(reference_gramian.double())
        assert torch.allclose(weights.double(), solved, atol=1e-5)

    # The shared gradient is sum_t w_t g_t with the parameter-level rows; heads get weight 1.
    assert torch.allclose(mtl.flat_grad(shared), weights @ parameter_rows, atol=1e-5)
    for t in range(n_tasks):
        assert torch.allclose(mtl.flat_grad(net.heads[t].parameters()), head_grads[t], atol=1e-6)


def test_feature_level_is_a_no_op_for_loss_level_methods(mtl: types.SimpleNamespace) -> None:
    net_a, net_b = mtl.make_net(3), mtl.make_net(3)
    x, y = mtl.make_batch(3, seed=2)
    z, losses = features_and_losses(mtl, net_a, x, y)
    methods.create("ew", 3).backward(losses, net_a.encoder.parameters(), features=z)
    methods.create("ew", 3).backward(mtl.task_losses(net_b, x, y), net_b.encoder.parameters())
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_feature_level_is_refused_for_libmtl_and_detached_features(mtl: types.SimpleNamespace) -> None:
    net = mtl.make_net(3)
    x, y = mtl.make_batch(3, seed=3)
    z, losses = features_and_losses(mtl, net, x, y)
    with pytest.raises(ValueError, match="parameter-level gradients only"):
        methods.create("libmtl:mgda", 3).backward(losses, net.encoder.parameters(), features=z)
    with pytest.raises(ValueError, match="shared representation"):
        methods.create("mgda", 3).backward(losses, net.encoder.parameters(), features=z.detach())


def test_unchecked_losses_skip_the_nan_check_and_checked_ones_raise(mtl: types.SimpleNamespace) -> None:
    net = mtl.make_net(3)
    x, y = mtl.make_batch(3, seed=4)
    poisoned = mtl.task_losses(net, x, y) * torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(methods.NonFiniteLossError, match="task 1"):
        methods.create("ew", 3).backward(poisoned, net.encoder.parameters())
    methods.create("ew", 3).backward(mtl.task_losses(net, x, y) * torch.tensor([1.0, float("nan"), 1.0]),
                                     net.encoder.parameters(), check_finite=False)
    assert torch.isnan(net.encoder[0].weight.grad).any()


def test_bench_run_at_feature_level_names_the_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    from bench.cli import main
    from bench.results_io import load_mlflow, method_label

    small = ["--task", "cxr14-synthetic", "--task-opt", "n_images=700", "--image-size", "16", "--batch-size", "64",
             "--epochs", "1", "--no-checkpoint", "--results", str(tmp_path)]  # fmt: skip
    assert main(["run", "--methods", "libmtl:mgda", "--grad-level", "features", *small]) == 2
    assert main(["run", "--methods", "ew", "--amp", "--device", "cpu", *small]) == 2
    assert main(["run", "--methods", "mgda", "--grad-level", "features", *small]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-bench/cxr14-synthetic").experiment_id])
    assert run.data.params["grad_level"] == "features" and run.data.params["amp"] == "False"
    assert run.info.run_name == "mgda-seed0-features" and run.info.status == "FINISHED"
    assert method_label(run.data.params) == "mgda@features"
    assert set(load_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}").long["method"]) == {"mgda@features"}
