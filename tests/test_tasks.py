"""Tests of the task-suite package: registry, models, multi-label losses/metrics, cxr14-synthetic."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

import tasks
from tasks import cxr14_synthetic, registry
from tasks.base import TaskSuite
from tasks.cxr14_synthetic import FINDINGS

SMALL = {"n_images": 1500, "image_size": 16}


@pytest.fixture(scope="module")
def suite() -> tasks.TaskSuite:
    return tasks.create("cxr14-synthetic", **SMALL)


@pytest.fixture(scope="module")
def other_seed_suite() -> tasks.TaskSuite:
    return tasks.create("cxr14-synthetic", data_seed=1, **SMALL)


# ---------------------------------------------------------------- registry


def test_available_lists_the_synthetic_suite() -> None:
    assert "cxr14-synthetic" in tasks.available()
    assert tasks.available() == sorted(tasks.available())


def test_unknown_suite_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown task suite 'cxr14-synthetc'.*cxr14-synthetic"):
        tasks.create("cxr14-synthetc")
    with pytest.raises(ValueError, match="valid names: .*cxr14-synthetic"):
        tasks.options("nope")


def test_unknown_option_lists_valid_options_with_defaults() -> None:
    with pytest.raises(TypeError, match=r"\['n_image'\].*n_images \(default \d+\).*image_size \(default 32\)"):
        tasks.create("cxr14-synthetic", n_image=100)


def test_default_options_are_described_and_build_a_valid_suite() -> None:
    infos = tasks.options("cxr14-synthetic")
    assert list(infos) == [
        "n_images", "image_size", "data_seed", "val_fraction", "test_fraction", "min_positives", "signal_scale"
    ]
    assert all(info.help and not info.required for info in infos.values())
    default_suite = tasks.create("cxr14-synthetic")
    assert default_suite.config() == {name: info.default for name, info in infos.items()}
    assert sum(len(dataset) for dataset in default_suite.splits().values()) == infos["n_images"].default


def test_run_defaults_are_declared_by_the_suite() -> None:
    assert tasks.run_defaults("cxr14-synthetic") == {"epochs": 2, "batch_size": 64}
    with pytest.raises(ValueError, match="valid names"):
        tasks.run_defaults("nope")


def test_register_sets_name_and_rejects_bad_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_SUITES", dict(registry._SUITES))

    class NeedsRoot(TaskSuite):
        option_help = {"root": "data directory", "size": "number of items"}

        def __init__(self, root: str, size: int = 4) -> None:
            self.root, self.size = root, size

    tasks.register("needs-root")(NeedsRoot)
    assert NeedsRoot.name == "needs-root"
    assert "needs-root" in tasks.available()
    assert tasks.options("needs-root")["root"].required
    with pytest.raises(TypeError, match=r"needs option\(s\) \['root'\].*root \(required\), size \(default 4\)"):
        tasks.create("needs-root")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("needs-root")(NeedsRoot)

    class Undocumented(TaskSuite):
        option_help = {"size": "number of items"}

        def __init__(self, size: int = 4, depth: int = 2) -> None:
            self.size, self.depth = size, depth

    with pytest.raises(TypeError, match="no help line for option 'depth'"):
        tasks.register("undocumented")(Undocumented)
    with pytest.raises(TypeError, match="must decorate a TaskSuite subclass"):
        tasks.register("not-a-suite")(dict)
    assert "undocumented" not in tasks.available()


# ---------------------------------------------------------------- option validation


@pytest.mark.parametrize(
    ("bad_options", "message"),
    [
        ({"n_images": 0}, r"n_images must be an integer in \[1, 112120\]"),
        ({"n_images": 200_000}, r"n_images must be an integer in \[1, 112120\]"),
        ({"n_images": "1500"}, r"n_images must be an integer in \[1, 112120\], got '1500'"),
        ({"n_images": 300}, r"n_images=300 .* use n_images in \[695, 112120\]"),
        ({"image_size": 8}, r"image_size must be an integer in \[16, 128\]"),
        ({"image_size": 32.0}, r"image_size must be an integer in \[16, 128\]"),
        ({"data_seed": -1}, r"data_seed must be an integer in \[0, "),
        ({"val_fraction": 0.0}, r"val_fraction must be a number in the open interval \(0.0, 1.0\)"),
        ({"test_fraction": 1.5}, r"test_fraction must be a number in the open interval \(0.0, 1.0\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be below 1"),
        ({"min_positives": 0}, r"min_positives must be an integer in \[1, 100\]"),
        ({"signal_scale": 0}, r"signal_scale must be a number in the open interval \(0.0, 10.0\)"),
        ({"signal_scale": True}, r"signal_scale must be a number"),
    ],
)
def test_bad_options_name_the_option_and_its_range(bad_options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tasks.create("cxr14-synthetic", **{**SMALL, **bad_options})


def test_missing_torchxrayvision_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cxr14_synthetic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install torchxrayvision"):
        cxr14_synthetic.metadata_path()


# ---------------------------------------------------------------- cxr14-synthetic data


def test_task_names_are_the_14_findings_in_order(suite: tasks.TaskSuite) -> None:
    assert suite.task_names == (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
        "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
    )  # fmt: skip
    assert (suite.primary_metric, suite.primary_direction) == ("mean_auroc", "maximize")


def test_split_sizes_and_item_format(suite: tasks.TaskSuite) -> None:
    splits = suite.splits()
    assert {name: len(dataset) for name, dataset in splits.items()} == {"train": 1050, "val": 150, "test": 300}
    x, y = splits["val"][7]
    assert x.dtype == torch.uint8 and x.shape == (1, 16, 16)
    assert x.to(torch.float32).std() > 2.0
    assert y.dtype == torch.float32 and y.shape == (14,)
    assert set(y.tolist()) <= {0.0, 1.0}
    ids = suite.item_ids("train")
    assert len(set(ids)) == len(ids) and all(item_id.endswith(".png") for item_id in ids)


def test_item_labels_are_the_real_table_labels(suite: tasks.TaskSuite) -> None:
    metadata = cxr14_synthetic.load_metadata()
    row_of_id = {image_id: row for row, image_id in enumerate(metadata.image_ids)}
    ids = suite.item_ids("test")
    rows = [row_of_id[image_id] for image_id in ids]
    assert torch.equal(suite.labels("test"), torch.as_tensor(metadata.labels[rows], dtype=torch.float32))
    assert suite.patient_ids("test") == metadata.patient_ids[rows].tolist()


def test_splits_are_patient_disjoint(suite: tasks.TaskSuite) -> None:
    patients = {split: set(suite.patient_ids(split)) for split in tasks.SPLIT_NAMES}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]


def test_every_finding_has_min_positives_in_every_split(suite: tasks.TaskSuite) -> None:
    for split in tasks.SPLIT_NAMES:
        positives = suite.labels(split).sum(dim=0)
        assert positives.min() >= 5, f"{split}: {dict(zip(FINDINGS, positives.tolist()))}"


def test_prevalence_follows_the_real_table(suite: tasks.TaskSuite) -> None:
    prevalence = suite.prevalence()
    assert prevalence == pytest.approx(suite.labels("train").mean(dim=0).tolist())
    by_finding = dict(zip(FINDINGS, prevalence))
    assert max(by_finding, key=by_finding.get) == "Infiltration"
    assert min(by_finding, key=by_finding.get) == "Hernia"
    assert by_finding["Infiltration"] == pytest.approx(0.177, abs=0.03)  # 19,894 of 112,120 in the table
    assert by_finding["Effusion"] > by_finding["Pneumonia"] > by_finding["Hernia"]
    table_prevalence = cxr14_synthetic.load_metadata().labels.mean(axis=0)
    assert spearmanr(prevalence, table_prevalence).statistic > 0.9


def test_same_data_seed_gives_identical_data(suite: tasks.TaskSuite) -> None:
    again = tasks.create("cxr14-synthetic", **SMALL)
    for split in tasks.SPLIT_NAMES:
        assert again.item_ids(split) == suite.item_ids(split)
        assert torch.equal(again.splits()[split].images, suite.splits()[split].images)
        assert torch.equal(again.labels(split), suite.labels(split))
    assert again.identity() == suite.identity()


def test_different_data_seed_gives_different_data(suite: tasks.TaskSuite, other_seed_suite: tasks.TaskSuite) -> None:
    for split in tasks.SPLIT_NAMES:
        assert other_seed_suite.item_ids(split) != suite.item_ids(split)
    assert not torch.equal(other_seed_suite.splits()["train"].images, suite.splits()["train"].images)
    assert other_seed_suite.identity()["splits"] != suite.identity()["splits"]


def test_an_image_depends_only_on_seed_and_id(suite: tasks.TaskSuite) -> None:
    larger = tasks.create("cxr14-synthetic", n_images=2000, image_size=16)
    image_of = {
        item_id: image
        for split in tasks.SPLIT_NAMES
        for item_id, image in zip(larger.item_ids(split), larger.splits()[split].images)
    }
    dataset = suite.splits()["train"]
    shared = [index for index, item_id in enumerate(dataset.item_ids) if item_id in image_of]
    assert len(shared) > 20
    for index in shared:
        assert torch.equal(dataset.images[index], image_of[dataset.item_ids[index]])


def test_findings_plant_signals_of_their_sign_and_strength(suite: tasks.TaskSuite) -> None:
    """Mean image of positives minus negatives: signed like the finding, larger for easy findings."""
    dataset = suite.splits()["train"]
    images = dataset.images.to(torch.float32) / 255.0
    gap = {}
    for t, finding in enumerate(FINDINGS):
        present = dataset.labels[:, t] == 1
        difference = images[present].mean(dim=0) - images[~present].mean(dim=0)
        sign = math.copysign(1.0, cxr14_synthetic.FINDING_SIGNALS[finding].amplitude)
        gap[finding] = (sign * difference).max().item()
    assert gap["Cardiomegaly"] > 0.1 and gap["Emphysema"] > 0.1
    assert gap["Emphysema"] > 2 * gap["Infiltration"]
    assert gap["Cardiomegaly"] > gap["Nodule"]


def test_identity_hashes_sorted_item_ids(suite: tasks.TaskSuite) -> None:
    identity = suite.identity()
    assert identity["suite"] == "cxr14-synthetic"
    assert identity["options"] == suite.config() and suite.config()["n_images"] == 1500
    ids = suite.item_ids("val")
    expected = hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()
    assert identity["splits"]["val"] == {"size": 150, "sha256": expected}


def test_unknown_split_name_is_rejected(suite: tasks.TaskSuite) -> None:
    with pytest.raises(ValueError, match="valid splits: train, val, test"):
        suite.item_ids("validation")


# ---------------------------------------------------------------- models


def test_model_outputs_one_logit_per_task_and_gradients_reach_encoder_and_heads(suite: tasks.TaskSuite) -> None:
    torch.manual_seed(0)
    model = suite.build_model("resnet18")
    assert len(model.heads) == 14
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.encoder.parameters()}
    x = torch.stack([suite.splits()["train"][i][0] for i in range(4)])
    y = suite.labels("train")[:4]
    outputs = model(x)
    assert outputs.shape == (4, 14)
    suite.losses(outputs, y).sum().backward()
    assert model.encoder.backbone.conv1.weight.grad is not None and model.encoder.backbone.conv1.weight.grad.abs().sum() > 0
    for head in model.heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("backbone", "feature_dim"), [("resnet18", 512), ("resnet50", 2048), ("densenet121", 1024)])
def test_build_encoder_reads_grayscale_and_returns_pooled_features(backbone: str, feature_dim: int) -> None:
    encoder, dim = tasks.build_encoder(backbone, in_channels=1)
    assert dim == feature_dim
    encoder.eval()
    with torch.no_grad():
        assert encoder(torch.rand(2, 1, 32, 32)).shape == (2, feature_dim)


def test_unknown_backbone_lists_valid_backbones() -> None:
    with pytest.raises(ValueError, match="valid backbones: resnet18, resnet50, densenet121"):
        tasks.build_encoder("vgg16")


# ---------------------------------------------------------------- losses, accuracy, metrics


def test_losses_equal_per_task_bce(suite: tasks.TaskSuite) -> None:
    generator = torch.Generator().manual_seed(1)
    outputs = torch.randn(8, 14, generator=generator, requires_grad=True)
    targets = (torch.rand(8, 14, generator=generator) < 0.3).to(torch.float32)
    losses = suite.losses(outputs, targets)
    expected = torch.stack([F.binary_cross_entropy_with_logits(outputs[:, t], targets[:, t]) for t in range(14)])
    assert losses.shape == (14,)
    torch.testing.assert_close(losses, expected)
    losses[3].backward()
    assert outputs.grad[:, 3].abs().sum() > 0 and outputs.grad[:, [0, 13]].abs().sum() == 0


def test_losses_reject_wrong_shapes(suite: tasks.TaskSuite) -> None:
    with pytest.raises(ValueError, match=r"shape \[N, 14\]"):
        suite.losses(torch.zeros(4, 13), torch.zeros(4, 13))


def test_correct_counts_threshold_half(suite: tasks.TaskSuite) -> None:
    outputs = torch.zeros(3, 14)
    outputs[:, 0] = torch.tensor([2.0, -2.0, 0.0])  # predictions 1, 0, 1 (sigmoid(0) = 0.5 counts as 1)
    outputs[:, 1] = torch.tensor([-1.0, -1.0, -1.0])  # predictions 0, 0, 0
    targets = torch.zeros(3, 14)
    targets[:, 0] = torch.tensor([1.0, 1.0, 1.0])
    targets[:, 1] = torch.tensor([0.0, 1.0, 0.0])
    counts = suite.correct(outputs, targets)
    assert counts.dtype == torch.float32 and counts.shape == (14,)
    assert counts[0] == 2 and counts[1] == 2
    assert counts[2:].tolist() == [0.0] * 12  # logit 0 predicts 1, every target there is 0


def test_evaluate_agrees_with_sklearn(suite: tasks.TaskSuite) -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((60, 14)) < 0.4).astype(np.float32)
    targets[0, :], targets[1, :] = 1.0, 0.0  # both classes in every task
    logits = rng.normal(size=(60, 14)) + 1.5 * (targets - 0.5)
    metrics = suite.evaluate(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(targets))
    predictions = (logits >= 0).astype(int)
    for t, task in enumerate(FINDINGS):
        assert metrics[f"auroc/{task}"] == pytest.approx(roc_auc_score(targets[:, t], logits[:, t]), abs=1e-6)
        assert metrics[f"accuracy/{task}"] == pytest.approx(accuracy_score(targets[:, t], predictions[:, t]))
        assert metrics[f"f1/{task}"] == pytest.approx(f1_score(targets[:, t], predictions[:, t]))
    assert metrics["mean_auroc"] == pytest.approx(np.mean([metrics[f"auroc/{task}"] for task in FINDINGS]))
    assert metrics["mean_accuracy"] == pytest.approx(np.mean([metrics[f"accuracy/{task}"] for task in FINDINGS]))
    assert metrics["mean_f1"] == pytest.approx(np.mean([metrics[f"f1/{task}"] for task in FINDINGS]))
    assert set(suite.metric_directions()) == set(metrics)


def test_single_class_task_gives_nan_warning_and_is_left_out_of_mean(suite: tasks.TaskSuite) -> None:
    rng = np.random.default_rng(4)
    targets = (rng.random((40, 14)) < 0.5).astype(np.float32)
    targets[0, :], targets[1, :] = 1.0, 0.0
    targets[:, FINDINGS.index("Hernia")] = 0.0
    logits = rng.normal(size=(40, 14))
    with pytest.warns(UndefinedMetricWarning, match="AUROC of task 'Hernia' is undefined"):
        metrics = suite.evaluate(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(targets))
    assert math.isnan(metrics["auroc/Hernia"])
    defined = [metrics[f"auroc/{task}"] for task in FINDINGS if task != "Hernia"]
    assert not any(math.isnan(value) for value in defined)
    assert metrics["mean_auroc"] == pytest.approx(np.mean(defined))
    assert metrics["accuracy/Hernia"] == pytest.approx(np.mean(logits[:, 13] < 0))
