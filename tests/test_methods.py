"""Native behaviour of the ``methods`` package: registry, hyperparameters, each method's rule,
the gradient engine, input validation, state round-trips, and a 14-task ResNet-18 smoke run."""

from __future__ import annotations

import copy
import io
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import methods
from methods import EpochStats, HParam, Need, NonFiniteLossError

NATIVE = ["cagrad", "deepchest", "ew", "gradnorm", "mgda", "pcgrad", "uw", "uwo", "uwso"]
GRADIENT_METHODS = ["mgda", "pcgrad", "cagrad", "gradnorm"]


def _stats(n_tasks, accuracy=None, loss=None):
    return {
        "train_loss": torch.ones(n_tasks) if loss is None else torch.tensor(loss),
        "train_accuracy": torch.full((n_tasks,), 0.5) if accuracy is None else torch.tensor(accuracy),
    }


def _into_gradient_phase(m, mtl, net, n_tasks, seed=50):
    """GradNorm: one epoch-0 step (EW, records the reference losses), then epoch_end."""
    x, y = mtl.make_batch(n_tasks, seed=seed)
    m.backward(mtl.task_losses(net, x, y), net.encoder.parameters())
    m.epoch_end(_stats(n_tasks))
    net.zero_grad(set_to_none=True)
    assert m.needs is Need.GRAMIAN


# ------------------------------------------------------------------------------- registry


def test_available_lists_the_native_methods():
    assert methods.available() == NATIVE
    assert methods.available(include_libmtl=False) == NATIVE


def test_available_with_libmtl_adds_the_wrappers_after_the_native_names():
    names = methods.available(include_libmtl=True)
    assert names[: len(NATIVE)] == NATIVE
    assert names[len(NATIVE) :] == [
        "libmtl:cagrad", "libmtl:ew", "libmtl:gradnorm", "libmtl:mgda", "libmtl:pcgrad", "libmtl:uw",
    ]


@pytest.mark.parametrize("name", ["dwa", "EW", "libmtl:deepchest", ""])
def test_unknown_method_name_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match="unknown method") as info:
        methods.create(name, 3)
    message = str(info.value)
    if name.startswith("libmtl:"):
        assert "libmtl:mgda" in message
    else:
        assert all(n in message for n in NATIVE)
    with pytest.raises(ValueError):
        methods.hparams(name)


def test_create_returns_the_registered_class_with_its_hparams():
    for name in NATIVE:
        m = methods.create(name, 4)
        assert isinstance(m, methods.Method) and m.name == name and m.n_tasks == 4
        assert type(m) is methods.method_class(name)
        for h in methods.hparams(name):
            assert getattr(m, h.name) == h.default


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="no hyperparameter alpha") as info:
        methods.create("cagrad", 3, alpha=0.4)
    assert "calpha" in str(info.value) and "rescale" in str(info.value)
    with pytest.raises(ValueError, match="takes none"):
        methods.create("ew", 3, temperature=2.0)


@pytest.mark.parametrize(
    "name, hp, expected",
    [
        ("cagrad", {"calpha": 1.5}, r"\[0\.0, 1\.0\]"),
        ("cagrad", {"calpha": -0.1}, r"\[0\.0, 1\.0\]"),
        ("cagrad", {"calpha": "abc"}, r"\[0\.0, 1\.0\]"),
        ("cagrad", {"calpha": float("nan")}, r"\[0\.0, 1\.0\]"),
        ("cagrad", {"calpha": True}, r"\[0\.0, 1\.0\]"),
        ("cagrad", {"rescale": 3}, "one of 0, 1, 2"),
        ("cagrad", {"rescale": 1.5}, "one of 0, 1, 2"),
        ("mgda", {"normalization": "l1"}, "one of 'none', 'l2', 'loss', 'loss\\+'"),
        ("mgda", {"normalization": 2}, "one of 'none'"),
        ("gradnorm", {"alpha": 6.0}, r"\[0\.0, 5\.0\]"),
        ("uwso", {"temperature": 0.0}, r"\[0\.01, 100\.0\]"),
        ("deepchest", {"factor": 0.9}, r"\[1\.0, 2\.0\]"),
        ("deepchest", {"signal": "auroc"}, "one of 'accuracy', 'loss'"),
        ("deepchest", {"init": "random"}, "one of 'ones', 'prevalence'"),
        ("pcgrad", {"seed": -1}, r"\[0, 4294967295\]"),
        ("pcgrad", {"seed": 1.5}, "int"),
    ],
)
def test_invalid_hyperparameter_values_name_the_valid_range(name, hp, expected):
    (key,) = hp
    with pytest.raises(ValueError, match=expected) as info:
        methods.create(name, 3, **hp)
    assert f"{name}.{key}" in str(info.value)


def test_declared_defaults_follow_the_design():
    defaults = {n: {h.name: h.default for h in methods.hparams(n)} for n in NATIVE}
    assert defaults["gradnorm"] == {"alpha": 1.5}
    assert defaults["cagrad"] == {"calpha": 0.5, "rescale": 1}
    assert defaults["mgda"] == {"normalization": "none"}
    assert defaults["uwso"] == {"temperature": 1.0}
    assert defaults["pcgrad"] == {"seed": 0}
    dc = defaults["deepchest"]
    assert (dc["factor"], dc["cap"], dc["decay"], dc["signal"], dc["init"]) == (
        1.1, 1.5, 1.05, "accuracy", "ones",
    )
    for name in ("ew", "uw", "uwo"):
        assert defaults[name] == {}
    for name in NATIVE:
        for h in methods.hparams(name):
            assert h.validate(h.default, name) == h.default  # every default is itself valid
    assert {h.name for h in methods.hparams("deepchest") if not h.tunable} == {"prevalence"}
    assert {h.name for h in methods.hparams("pcgrad") if not h.tunable} == {"seed"}


def test_command_line_strings_are_coerced():
    m = methods.create("cagrad", 3, calpha="0.4", rescale="2")
    assert m.calpha == 0.4 and isinstance(m.calpha, float)
    assert m.rescale == 2 and isinstance(m.rescale, int)
    assert methods.create("pcgrad", 3, seed="12").seed == 12
    assert methods.create("uwso", 3, temperature="5").temperature == 5.0
    dc = methods.create("deepchest", 3, init="prevalence", prevalence="0.1,0.2,0.3")
    assert dc.prevalence == (0.1, 0.2, 0.3)
    flag = HParam("flag", bool, False, "a switch")
    for text, value in [("true", True), ("True", True), ("1", True), ("yes", True),
                        ("false", False), ("0", False), ("off", False)]:
        assert flag.validate(text, "m") is value
    with pytest.raises(ValueError, match="true or false"):
        flag.validate("maybe", "m")


@pytest.mark.parametrize("n_tasks", [1, 0, -3, 2.0, True, "3"])
def test_n_tasks_must_be_an_integer_of_at_least_two(n_tasks):
    with pytest.raises(ValueError, match="n_tasks"):
        methods.create("ew", n_tasks)


# ---------------------------------------------------------------------------- DeepChest


def test_deepchest_epoch_rule_hand_computed():
    m = methods.create("deepchest", 3)
    torch.testing.assert_close(m.weigh(torch.ones(3), None).weights, torch.ones(3))
    m.epoch_end({"train_loss": [1.0, 1.0, 1.0], "train_accuracy": [0.9, 0.5, 0.7]})
    # mean 0.7: task 1 lags (x1.1); task 0 above and task 2 tied with the mean decay (/1.05)
    torch.testing.assert_close(
        m.weigh(torch.ones(3), None).weights, torch.tensor([1 / 1.05, 1.1, 1 / 1.05])
    )
    m.epoch_end(EpochStats(train_loss=torch.ones(3), train_accuracy=torch.tensor([0.2, 0.9, 0.7])))
    # mean 0.6: task 0 lags
    torch.testing.assert_close(
        m.weigh(torch.ones(3), None).weights,
        torch.tensor([1.1 / 1.05, 1.1 / 1.05, 1 / 1.05**2]),
    )


def test_deepchest_caps_a_task_that_keeps_lagging():
    m = methods.create("deepchest", 3)
    expected_lagging = [1.1, 1.21, 1.331, 1.4641, 1.5, 1.5, 1.5]
    for epoch, lag in enumerate(expected_lagging, start=1):
        m.epoch_end(_stats(3, accuracy=[0.9, 0.1, 0.95]))
        w = m.weigh(torch.ones(3), None).weights
        torch.testing.assert_close(
            w, torch.tensor([1.05**-epoch, lag, 1.05**-epoch]), rtol=1e-6, atol=0
        )
    # once it catches up it decays from the cap; no floor, no renormalisation
    m.epoch_end(_stats(3, accuracy=[0.2, 0.9, 0.95]))
    assert m.weigh(torch.ones(3), None).weights[1].item() == pytest.approx(1.5 / 1.05)
    assert m.weigh(torch.ones(3), None).weights[0].item() == pytest.approx(1.05**-7 * 1.1)


def test_deepchest_custom_factor_cap_decay():
    m = methods.create("deepchest", 2, factor=1.5, cap=2.0, decay=2.0)
    m.epoch_end(_stats(2, accuracy=[0.3, 0.6]))
    m.epoch_end(_stats(2, accuracy=[0.3, 0.6]))
    torch.testing.assert_close(m.weigh(torch.ones(2), None).weights, torch.tensor([2.0, 0.25]))


def test_deepchest_weights_are_constant_within_an_epoch(mtl):
    n_tasks = 3
    net = mtl.make_net(n_tasks, seed=0)
    m = methods.create("deepchest", n_tasks, init="prevalence", prevalence=(0.1, 0.4, 0.0))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for epoch in range(3):
        seen = []
        for step in range(3):
            x, y = mtl.make_batch(n_tasks, seed=10 * epoch + step)
            opt.zero_grad(set_to_none=True)
            losses = mtl.task_losses(net, x, y)
            jac = mtl.jacobian(losses, list(net.parameters()))
            seen.append(m.backward(losses, net.encoder.parameters()))
            # loss-level method: every parameter gets grad of sum_t w_t L_t
            torch.testing.assert_close(mtl.flat_grad(net.parameters()), seen[-1] @ jac)
            opt.step()
        for w in seen[1:]:
            torch.testing.assert_close(w, seen[0], rtol=0, atol=0)
        if epoch == 0:
            torch.testing.assert_close(seen[0], torch.tensor([1.05, 1.2, 1.0]))
        previous = seen[0]
        m.epoch_end(_stats(n_tasks, accuracy=[0.5, 0.9, 0.6]))
        assert not torch.equal(m.weigh(torch.ones(n_tasks), None).weights, previous)


def test_deepchest_prevalence_init():
    m = methods.create("deepchest", 4, init="prevalence", prevalence=[0.0, 0.2, 0.5, 1.0])
    torch.testing.assert_close(
        m.weigh(torch.ones(4), None).weights, torch.tensor([1.0, 1.1, 1.25, 1.5])
    )
    assert methods.deepchest.prevalence_weights(torch.tensor([0.3])).item() == pytest.approx(1.15)


@pytest.mark.parametrize(
    "hp, match",
    [
        ({"init": "prevalence"}, "needs prevalence"),
        ({"init": "prevalence", "prevalence": (0.1, 0.2)}, "needs prevalence"),
        ({"init": "prevalence", "prevalence": (0.1, 0.2, 1.5)}, r"\[0, 1\]"),
        ({"init": "prevalence", "prevalence": "0.1,x,0.3"}, "prevalence"),
    ],
)
def test_deepchest_prevalence_init_errors(hp, match):
    with pytest.raises(ValueError, match=match):
        methods.create("deepchest", 3, **hp)


def test_deepchest_needs_train_accuracy():
    m = methods.create("deepchest", 3)
    with pytest.raises(ValueError, match="train_accuracy"):
        m.epoch_end({"train_loss": torch.ones(3)})
    with pytest.raises(ValueError, match="train_accuracy"):
        m.epoch_end(EpochStats(train_loss=torch.ones(3)))
    with pytest.raises(ValueError, match=r"train_accuracy must have shape \[3\]"):
        m.epoch_end(_stats(3, accuracy=[0.5, 0.5]))
    with pytest.raises(ValueError, match="unknown epoch statistics"):
        m.epoch_end({"train_loss": torch.ones(3), "val_auroc": torch.ones(3)})
    with pytest.raises(ValueError, match="train_loss"):
        m.epoch_end({"train_accuracy": torch.ones(3)})
    torch.testing.assert_close(m.weigh(torch.ones(3), None).weights, torch.ones(3))


def test_deepchest_loss_signal():
    m = methods.create("deepchest", 3, signal="loss")
    m.epoch_end({"train_loss": [1.0, 2.0, 4.0]})  # first epoch: records only
    torch.testing.assert_close(m.weigh(torch.ones(3), None).weights, torch.ones(3))
    # ratios to the previous epoch: 0.5, 0.95, 0.6 (mean 0.683): task 1 fell least -> up-weighted
    m.epoch_end({"train_loss": [0.5, 1.9, 2.4]})
    torch.testing.assert_close(
        m.weigh(torch.ones(3), None).weights, torch.tensor([1 / 1.05, 1.1, 1 / 1.05])
    )
    # next epoch compares with the previous epoch, not the first: ratios 1.0, 0.5, 0.5
    m.epoch_end({"train_loss": [0.5, 0.95, 1.2]})
    torch.testing.assert_close(
        m.weigh(torch.ones(3), None).weights,
        torch.tensor([1.1 / 1.05, 1.1 / 1.05, 1 / 1.05**2]),
    )


# ----------------------------------------------------------------------- UW-SO, UW-O, UW, EW


def test_uwso_hand_computed():
    losses = torch.tensor([0.5, 1.0, 2.0])  # inverses 2, 1, 0.5
    w1 = methods.create("uwso", 3).weigh(losses, None).weights
    torch.testing.assert_close(w1, torch.tensor([0.62853172, 0.2312239, 0.14024438]))
    w2 = methods.create("uwso", 3, temperature=2.0).weigh(losses, None).weights
    torch.testing.assert_close(w2, torch.tensor([0.48102426, 0.29175596, 0.22721977]))
    inv = 1 / losses
    for t in (0.3, 1.0, 7.0):
        w = methods.create("uwso", 3, temperature=t).weigh(losses, None).weights
        torch.testing.assert_close(w, torch.exp(inv / t) / torch.exp(inv / t).sum())


def test_uwso_higher_temperature_is_closer_to_uniform():
    losses = torch.tensor([0.2, 0.7, 1.5, 3.0])
    spreads = []
    for t in (0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0):
        w = methods.create("uwso", 4, temperature=t).weigh(losses, None).weights
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (w > 0).all()
        assert torch.equal(torch.argsort(w, descending=True), torch.arange(4))  # smaller loss, more weight
        spreads.append((w - 0.25).abs().max().item())
    assert all(a > b for a, b in zip(spreads, spreads[1:]))
    assert spreads[-1] < 0.01


@pytest.mark.parametrize("name", ["uwso", "uwo", "ew"])
def test_loss_level_gradient_is_detached_weighted_sum(mtl, name):
    n_tasks = 4
    net = mtl.make_net(n_tasks, seed=3)
    x, y = mtl.make_batch(n_tasks, seed=3)
    losses = mtl.task_losses(net, x, y)
    params = list(net.parameters())
    jac = mtl.jacobian(losses, params)  # over shared AND head parameters
    m = methods.create(name, n_tasks)
    w = m.backward(losses, net.encoder.parameters())
    assert not w.requires_grad
    expected = {
        "uwso": torch.softmax(1 / losses.detach(), dim=0),
        "uwo": 1 / losses.detach(),
        "ew": torch.ones(n_tasks),
    }[name]
    torch.testing.assert_close(w, expected)
    if name == "uwso":
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    # weights are treated as constants: no d w / d theta term in the gradient
    torch.testing.assert_close(mtl.flat_grad(params), w @ jac, rtol=1e-5, atol=1e-7)


def test_ew_gradient_equals_gradient_of_the_sum(mtl):
    net = mtl.make_net(3, seed=4)
    ref = copy.deepcopy(net)
    x, y = mtl.make_batch(3, seed=4)
    w = methods.create("ew", 3).backward(mtl.task_losses(net, x, y), net.encoder.parameters())
    torch.testing.assert_close(w, torch.ones(3))
    mtl.task_losses(ref, x, y).sum().backward()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_uwo_clamps_a_zero_loss():
    w = methods.create("uwo", 2).weigh(torch.tensor([0.0, 2.0]), None).weights
    assert torch.isfinite(w).all() and w[1].item() == 0.5


def test_uw_loss_formula_and_log_variance_gradient(mtl):
    n_tasks = 3
    net = mtl.make_net(n_tasks, seed=5)
    m = methods.create("uw", n_tasks)
    (s,) = list(m.parameters())
    torch.testing.assert_close(s.detach(), torch.full((n_tasks,), -0.5))
    x, y = mtl.make_batch(n_tasks, seed=5)
    losses = mtl.task_losses(net, x, y)
    w = m.backward(losses, net.encoder.parameters())
    torch.testing.assert_close(w, torch.full((n_tasks,), math.exp(0.5) / 2))

    with torch.no_grad():
        s.copy_(torch.tensor([0.0, 1.0, -1.0]))
    s.grad = None
    net.zero_grad(set_to_none=True)
    losses = mtl.task_losses(net, x, y)
    jac = mtl.jacobian(losses, list(net.parameters()))
    w = m.backward(losses, net.encoder.parameters())
    expected_w = 1 / (2 * torch.exp(torch.tensor([0.0, 1.0, -1.0])))
    torch.testing.assert_close(w, expected_w)
    # d/ds_t [L_t / (2 e^{s_t}) + s_t / 2] = -L_t / (2 e^{s_t}) + 1/2
    torch.testing.assert_close(s.grad, -losses.detach() * expected_w + 0.5)
    torch.testing.assert_close(mtl.flat_grad(net.parameters()), expected_w @ jac, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------- gradient engine


def test_ew_backward_accumulates(mtl):
    net = mtl.make_net(3, seed=6)
    x, y = mtl.make_batch(3, seed=6)
    m = methods.create("ew", 3)
    m.backward(mtl.task_losses(net, x, y), net.encoder.parameters())
    once = [p.grad.clone() for p in net.parameters()]
    m.backward(mtl.task_losses(net, x, y), net.encoder.parameters())
    for p, g in zip(net.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)


def _prepared(name, mtl, net, n_tasks):
    m = methods.create(name, n_tasks, **({"calpha": 0.4} if name == "cagrad" else {}))
    if name == "gradnorm":
        _into_gradient_phase(m, mtl, net, n_tasks)
    return m


@pytest.mark.parametrize("n_tasks", [3, 4])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_write_sum_of_weighted_task_gradients(mtl, name, n_tasks):
    net = mtl.make_net(n_tasks, seed=7)
    m = _prepared(name, mtl, net, n_tasks)
    x, y = mtl.make_batch(n_tasks, seed=7)
    losses = mtl.task_losses(net, x, y)
    shared = list(net.encoder.parameters())
    jac = mtl.jacobian(losses, shared)
    head_grads = [
        mtl.jacobian(losses[t : t + 1], list(net.heads[t].parameters()))[0] for t in range(n_tasks)
    ]
    w = m.backward(losses, shared)
    assert w.shape == (n_tasks,) and not w.requires_grad and torch.isfinite(w).all()
    torch.testing.assert_close(mtl.flat_grad(shared), w @ jac, rtol=1e-5, atol=1e-7)
    for t in range(n_tasks):  # each head: its own task's gradient, weight 1
        torch.testing.assert_close(mtl.flat_grad(net.heads[t].parameters()), head_grads[t])
    if name in ("mgda", "pcgrad", "cagrad"):
        assert len(list(m.parameters())) == 0


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_accumulate_into_existing_grad(mtl, name):
    n_tasks = 3
    net = mtl.make_net(n_tasks, seed=8)
    fresh, filled = copy.deepcopy(net), copy.deepcopy(net)
    x, y = mtl.make_batch(n_tasks, seed=8)
    results = []
    for model in (fresh, filled):
        m = _prepared(name, mtl, model, n_tasks)
        if model is filled:
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.25)
        results.append(m.backward(mtl.task_losses(model, x, y), model.encoder.parameters()))
    torch.testing.assert_close(results[0], results[1])
    for a, b in zip(fresh.parameters(), filled.parameters()):
        torch.testing.assert_close(b.grad - 0.25, a.grad, rtol=1e-5, atol=1e-6)


def test_task_jacobian_rows_match_autograd_and_zero_where_a_parameter_is_unreached(monkeypatch):
    empty = torch.empty
    # were J ever allocated uninitialised, it would start as garbage here
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    torch.manual_seed(3)
    trunk, side = nn.Linear(4, 5), nn.Linear(4, 5)  # only task 0 reads `side`
    unused = nn.Parameter(torch.randn(3))  # shared but in no task's graph
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(3))
    x = torch.randn(6, 4)
    z = trunk(x).tanh()
    losses = torch.stack([
        (heads[0](z + side(x)) ** 2).mean(), heads[1](z).pow(2).mean(), heads[2](z).abs().mean()
    ])
    shared = [*trunk.parameters(), unused, *side.parameters()]
    for p in shared:
        p.grad = torch.full_like(p, 7.0)
    expected = torch.stack([
        torch.cat([torch.zeros(3) if g is None else g.reshape(-1)
                   for g in torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)])
        for t in range(3)
    ])
    head_expected = [torch.autograd.grad(losses[t], heads[t].weight, retain_graph=True)[0] for t in range(3)]
    jac = methods.task_jacobian(losses, shared)
    torch.testing.assert_close(jac, expected)
    start = trunk.weight.numel() + trunk.bias.numel()
    assert (jac[:, start : start + 3] == 0).all() and (jac[1:, start + 3 :] == 0).all()
    assert all((p.grad == 7.0).all() for p in shared)  # held gradients restored
    for t in range(3):
        torch.testing.assert_close(heads[t].weight.grad, head_expected[t])


def test_gradient_methods_refuse_non_float32_shared_parameters_loss_methods_do_not():
    torch.manual_seed(4)
    encoder, heads = nn.Linear(3, 4).double(), nn.ModuleList(nn.Linear(4, 1).double() for _ in range(2))
    x = torch.randn(5, 3, dtype=torch.float64)

    def losses():
        z = encoder(x)
        return torch.stack([heads[t](z).pow(2).mean() for t in range(2)]).float()

    with pytest.raises(ValueError, match="float32 shared parameters.*torch.float64"):
        methods.create("mgda", 2).backward(losses(), encoder.parameters())
    methods.create("ew", 2).backward(losses(), encoder.parameters())
    assert encoder.weight.grad is not None and encoder.weight.grad.dtype == torch.float64


def test_duplicate_shared_params_are_counted_once(mtl):
    net = mtl.make_net(3, seed=9)
    ref = copy.deepcopy(net)
    x, y = mtl.make_batch(3, seed=9)
    methods.create("mgda", 3).backward(
        mtl.task_losses(net, x, y), list(net.encoder.parameters()) * 2
    )
    methods.create("mgda", 3).backward(mtl.task_losses(ref, x, y), ref.encoder.parameters())
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_timer_sees_both_phases(mtl):
    import contextlib

    phases = []

    def timer(phase):
        phases.append(phase)
        return contextlib.nullcontext()

    net = mtl.make_net(3, seed=9)
    x, y = mtl.make_batch(3, seed=9)
    methods.create("pcgrad", 3).backward(mtl.task_losses(net, x, y), net.encoder.parameters(), timer=timer)
    assert set(phases) == {"gradients", "weighting"}


@pytest.mark.parametrize("alpha", [1.5, 0.0])  # these change the signs in L_grad's derivative
def test_gradnorm_spec(mtl, alpha):
    """Epoch 0 is EW and its reference losses are the mean of the losses seen in backward;
    afterwards w = T softmax(s), the shared gradient is sum_t w_t g_t and s gets the gradient of
    L_grad = sum_t |w_t ||g_t|| - detach(mean_k(w_k ||g_k||) r_t^alpha)|."""
    n_tasks = 3
    net = mtl.make_net(n_tasks, seed=10)
    m = methods.create("gradnorm", n_tasks, alpha=alpha)
    assert m.needs is Need.NOTHING
    with pytest.raises(RuntimeError, match="before any backward"):
        methods.create("gradnorm", n_tasks).epoch_end(_stats(n_tasks))
    seen = []
    for step in range(2):
        x, y = mtl.make_batch(n_tasks, seed=100 + step)
        losses = mtl.task_losses(net, x, y)
        jac = mtl.jacobian(losses, list(net.parameters()))
        net.zero_grad(set_to_none=True)
        w = m.backward(losses, net.encoder.parameters())
        torch.testing.assert_close(w, torch.ones(n_tasks))
        torch.testing.assert_close(mtl.flat_grad(net.parameters()), w @ jac)  # EW on everything
        assert m.scores.grad is None
        seen.append(losses.detach())
    # the statistics' train_loss is NOT the reference: the losses seen in backward are
    m.epoch_end(_stats(n_tasks, loss=[123.0, 456.0, 789.0]))
    reference = (seen[0] + seen[1]) / 2

    with torch.no_grad():
        m.scores.copy_(torch.tensor([0.3, -0.2, 0.1]))
    net.zero_grad(set_to_none=True)
    x, y = mtl.make_batch(n_tasks, seed=102)
    losses = mtl.task_losses(net, x, y)
    jac = mtl.jacobian(losses, list(net.encoder.parameters()))
    w = m.backward(losses, net.encoder.parameters())

    s = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    weights = n_tasks * torch.softmax(s, dim=0)
    grad_norms = weights * jac.norm(dim=1)
    ratio = losses.detach() / reference
    rate = ratio / ratio.mean()
    l_grad = (grad_norms - (grad_norms.mean() * rate**alpha).detach()).abs().sum()
    (expected_s_grad,) = torch.autograd.grad(l_grad, s)
    torch.testing.assert_close(w, weights.detach())
    torch.testing.assert_close(m.scores.grad, expected_s_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mtl.flat_grad(net.encoder.parameters()), w @ jac, rtol=1e-5, atol=1e-7)


def test_cagrad_direction_is_optimal_for_its_problem():
    """CAGrad's d = g0 + c ||g0|| g_w / ||g_w|| (rescale 0) maximises min_t <g_t, d> over the ball
    ||d - g0|| <= calpha ||g0||: check against many points of that ball (solver-free)."""
    g = torch.Generator().manual_seed(0)
    for n_tasks, calpha in ((3, 0.4), (5, 0.5), (8, 0.9)):
        jac = (torch.randn(n_tasks, 12, generator=g) + 0.5 * torch.randn(1, 12, generator=g)).double()
        gram = (jac @ jac.T).float()
        w = methods.create("cagrad", n_tasks, calpha=calpha, rescale=0).weigh(
            torch.ones(n_tasks), gram
        ).weights.double()
        d = jac.T @ w
        g0 = jac.mean(dim=0)
        radius = calpha * g0.norm()
        assert (d - g0).norm().item() == pytest.approx(radius.item(), rel=1e-4)
        best = (jac @ d).min()
        u = torch.randn(4000, 12, generator=g).double()
        candidates = g0 + radius * u / u.norm(dim=1, keepdim=True)
        assert (jac @ candidates.T).min(dim=0).values.max() <= best + 1e-4 * best.abs()
        assert best >= (jac @ g0).min()
        for rescale, divisor in ((1, 1 + calpha**2), (2, 1 + calpha)):
            w_r = methods.create("cagrad", n_tasks, calpha=calpha, rescale=rescale).weigh(
                torch.ones(n_tasks), gram
            ).weights.double()
            torch.testing.assert_close(w_r * divisor, w, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(params=["ew", "mgda"])
def method_and_net(request, mtl):
    n_tasks = 3
    return methods.create(request.param, n_tasks), mtl.make_net(n_tasks, seed=11), mtl


def _no_grad_written(net):
    return all(p.grad is None for p in net.parameters())


def test_wrong_number_of_losses(method_and_net):
    m, net, mtl = method_and_net
    x, y = mtl.make_batch(3, seed=0)
    with pytest.raises(ValueError, match="created for 3 tasks but got 2"):
        m.backward(mtl.task_losses(net, x, y)[:2], net.encoder.parameters())
    assert _no_grad_written(net)


def test_two_dimensional_losses(method_and_net):
    m, net, mtl = method_and_net
    x, y = mtl.make_batch(3, seed=0)
    with pytest.raises(ValueError, match=r"shape \[n_tasks\]"):
        m.backward(mtl.task_losses(net, x, y).unsqueeze(1), net.encoder.parameters())
    with pytest.raises(ValueError, match=r"shape \[n_tasks\]"):
        m.backward(mtl.task_losses(net, x, y).sum(), net.encoder.parameters())
    assert _no_grad_written(net)


def test_list_of_losses(method_and_net):
    m, net, mtl = method_and_net
    x, y = mtl.make_batch(3, seed=0)
    out = (net(x) - y) ** 2
    with pytest.raises(ValueError, match="loss of task 1 must be a scalar"):
        m.backward([out[:, 0].mean(), out[:, 1], out[:, 2].mean()], net.encoder.parameters())
    with pytest.raises(ValueError, match="loss of task 2 must be a scalar"):
        m.backward([out[:, 0].mean(), out[:, 1].mean(), 3.0], net.encoder.parameters())
    assert _no_grad_written(net)
    w = m.backward([out[:, t].mean() for t in range(3)], net.encoder.parameters())
    assert w.shape == (3,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_names_the_task(method_and_net, bad):
    m, net, mtl = method_and_net
    x, y = mtl.make_batch(3, seed=0)
    losses = mtl.task_losses(net, x, y) * torch.tensor([1.0, bad, 1.0])
    with pytest.raises(NonFiniteLossError, match="task 1") as info:
        m.backward(losses, net.encoder.parameters())
    assert "task 0" not in str(info.value) and "task 2" not in str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert _no_grad_written(net)


def test_losses_that_do_not_require_grad(method_and_net):
    m, net, mtl = method_and_net
    x, y = mtl.make_batch(3, seed=0)
    with torch.no_grad():
        losses = mtl.task_losses(net, x, y)
    with pytest.raises(ValueError, match="do not require grad"):
        m.backward(losses, net.encoder.parameters())
    with pytest.raises(ValueError, match="do not require grad"):
        m.backward(mtl.task_losses(net, x, y).detach(), net.encoder.parameters())


def test_empty_or_frozen_shared_params(method_and_net):
    m, net, mtl = method_and_net
    x, y = mtl.make_batch(3, seed=0)
    with pytest.raises(ValueError, match="shared_params is empty"):
        m.backward(mtl.task_losses(net, x, y), [])
    with pytest.raises(ValueError, match="shared_params is empty"):
        m.backward(mtl.task_losses(net, x, y), iter(()))
    with pytest.raises(ValueError, match="require grad"):
        m.backward(mtl.task_losses(net, x, y), [torch.zeros(3)])
    assert _no_grad_written(net)


def test_mgda_loss_normalisation_refuses_a_zero_loss():
    theta = nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = torch.stack([theta[0] * 0, theta[1] ** 2, theta.sum()])
    with pytest.raises(FloatingPointError, match="normaliser is zero"):
        methods.create("mgda", 3, normalization="loss").backward(losses, [theta])


# ------------------------------------------------------------------ state_dict round-trip


def _conflicting_gramian(n_tasks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(n_tasks, 6, generator=g)
    return jac @ jac.T


def test_pcgrad_state_dict_restores_the_random_order():
    gram = _conflicting_gramian()
    m1 = methods.create("pcgrad", 4, seed=3)
    for _ in range(3):
        m1.weigh(torch.ones(4), gram)
    state = m1.state_dict()
    m2 = methods.create("pcgrad", 4)  # seed 0: a different generator until loaded
    fresh = methods.create("pcgrad", 4)
    m2.load_state_dict(state)
    after1 = [m1.weigh(torch.ones(4), gram).weights for _ in range(8)]
    after2 = [m2.weigh(torch.ones(4), gram).weights for _ in range(8)]
    other = [fresh.weigh(torch.ones(4), gram).weights for _ in range(8)]
    for a, b in zip(after1, after2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the order matters on this Gramian, so the test would notice a lost generator state
    assert any(not torch.allclose(a, b) for a, b in zip(after1, other))
    assert len({tuple(w.tolist()) for w in after1}) > 1


def test_pcgrad_same_seed_same_orders_different_seed_differs():
    gram = _conflicting_gramian()
    runs = {
        seed: [methods.create("pcgrad", 4, seed=seed).weigh(torch.ones(4), gram).weights]
        for seed in range(6)
    }
    again = methods.create("pcgrad", 4, seed=2).weigh(torch.ones(4), gram).weights
    torch.testing.assert_close(again, runs[2][0], rtol=0, atol=0)
    assert len({tuple(v[0].tolist()) for v in runs.values()}) > 1


def test_gradnorm_state_dict_restores_epoch_and_reference(mtl):
    n_tasks = 3
    net = mtl.make_net(n_tasks, seed=12)
    m1 = methods.create("gradnorm", n_tasks)
    opt = torch.optim.SGD(list(net.parameters()) + list(m1.parameters()), lr=0.05)
    for step in range(2):
        x, y = mtl.make_batch(n_tasks, seed=200 + step)
        opt.zero_grad()
        m1.backward(mtl.task_losses(net, x, y), net.encoder.parameters())
        opt.step()
    m1.epoch_end(_stats(n_tasks))
    x, y = mtl.make_batch(n_tasks, seed=202)
    opt.zero_grad()
    m1.backward(mtl.task_losses(net, x, y), net.encoder.parameters())
    opt.step()

    m2 = methods.create("gradnorm", n_tasks)
    assert m2.needs is Need.NOTHING
    m2.load_state_dict(m1.state_dict())
    assert m2.needs is Need.GRAMIAN
    net1, net2 = copy.deepcopy(net), copy.deepcopy(net)
    x, y = mtl.make_batch(n_tasks, seed=203)
    w1 = m1.backward(mtl.task_losses(net1, x, y), net1.encoder.parameters())
    m1.scores.grad = None
    m1.backward(mtl.task_losses(net1, x, y), net1.encoder.parameters())
    w2 = m2.backward(mtl.task_losses(net2, x, y), net2.encoder.parameters())
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    assert not torch.allclose(w1, torch.ones(n_tasks))
    torch.testing.assert_close(m1.scores.grad, m2.scores.grad)


@pytest.mark.parametrize("signal", ["accuracy", "loss"])
def test_deepchest_state_dict_restores_weights(signal):
    m1 = methods.create("deepchest", 3, signal=signal)
    for acc, loss in (([0.9, 0.5, 0.6], [1.0, 2.0, 3.0]), ([0.4, 0.8, 0.9], [0.5, 1.9, 2.0])):
        m1.epoch_end({"train_loss": loss, "train_accuracy": acc})
    m2 = methods.create("deepchest", 3, signal=signal)
    m2.load_state_dict(m1.state_dict())
    torch.testing.assert_close(m2.weigh(torch.ones(3), None).weights, m1.weigh(torch.ones(3), None).weights)
    assert not torch.allclose(m1.weigh(torch.ones(3), None).weights, torch.ones(3))
    stats = {"train_loss": [0.4, 1.0, 1.9], "train_accuracy": [0.7, 0.6, 0.95]}
    m1.epoch_end(stats)
    m2.epoch_end(stats)
    torch.testing.assert_close(m2.weigh(torch.ones(3), None).weights, m1.weigh(torch.ones(3), None).weights)


@pytest.mark.parametrize("name", methods.available(include_libmtl=True))
def test_every_methods_state_loads_weights_only_and_restores_it(mtl, name):
    """An epoch checkpoint is read with ``weights_only=True``: every method's state must load so."""
    n_tasks = 3
    net = mtl.make_net(n_tasks, seed=5)

    def weights(method, seed):
        random.seed(seed)  # for methods that draw at random
        np.random.seed(seed)
        torch.manual_seed(seed)
        copied = copy.deepcopy(net)
        x, y = mtl.make_batch(n_tasks, seed=seed)
        return method.backward(mtl.task_losses(copied, x, y), copied.encoder.parameters())

    m1 = methods.create(name, n_tasks)
    for epoch in range(2):
        for step in range(2):
            weights(m1, seed=10 * epoch + step)
        m1.epoch_end(_stats(n_tasks, accuracy=[0.9, 0.5, 0.6 + 0.1 * epoch], loss=[1.0, 2.0 - epoch, 3.0]))
    buffer = io.BytesIO()
    torch.save(m1.state_dict(), buffer)
    buffer.seek(0)
    m2 = methods.create(name, n_tasks)
    m2.load_state_dict(torch.load(buffer, weights_only=True))
    for seed in (100, 101):
        torch.testing.assert_close(weights(m2, seed), weights(m1, seed), rtol=0, atol=0)


# ---------------------------------------------------------- 14 tasks on a ResNet-18 encoder


class _ResNetMTL(nn.Module):
    def __init__(self, n_tasks):
        super().__init__()
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        self.encoder = torchvision.models.resnet18(weights=None, num_classes=7)
        self.encoder.fc = nn.Identity()  # num_classes is irrelevant once fc is gone
        self.heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(n_tasks))

    def forward(self, x):
        h = self.encoder(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


@pytest.fixture(scope="module")
def resnet_14():
    return _ResNetMTL(14)


@pytest.mark.parametrize("name", NATIVE)
def test_every_method_on_resnet18_with_14_tasks(resnet_14, name):
    n_tasks = 14
    net = copy.deepcopy(resnet_14)
    m = methods.create(name, n_tasks, **({"init": "prevalence", "prevalence": [0.1] * 14} if name == "deepchest" else {}))
    opt = torch.optim.SGD(list(net.parameters()) + list(m.parameters()), lr=0.01)
    g = torch.Generator().manual_seed(0)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    for step in range(2):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = (torch.rand(4, n_tasks, generator=g) < 0.3).float()
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        losses = loss_fn(logits, y).mean(dim=0)
        w = m.backward(losses, net.encoder.parameters())
        assert w.shape == (n_tasks,) and torch.isfinite(w).all()
        for pname, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        for p in m.parameters():
            if name == "uw" or step == 1:
                assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        if step == 0:
            accuracy = ((logits.detach() > 0).float() == y).float().mean(dim=0)
            m.epoch_end(EpochStats(train_loss=losses.detach(), train_accuracy=accuracy))
            if name == "gradnorm":
                assert m.needs is Need.GRAMIAN
