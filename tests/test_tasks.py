"""The task-suite registry and the cxr14-synthetic suite."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

import tasks
from tasks.cxr14_synthetic import FINDINGS, load_metadata

SMALL = {"n_images": 700, "image_size": 16}


@pytest.fixture(scope="module")
def suite() -> tasks.TaskSuite:
    return tasks.create("cxr14-synthetic", **SMALL)


def test_registry_lists_and_rejects_with_valid_names() -> None:
    assert "cxr14-synthetic" in tasks.available()
    with pytest.raises(ValueError, match="valid names: .*cxr14-synthetic"):
        tasks.create("nosuch")
    with pytest.raises(TypeError, match="valid options: .*n_images"):
        tasks.create("cxr14-synthetic", nosuch=1)
    options = tasks.options("cxr14-synthetic")
    assert options["image_size"].default == 32 and not options["image_size"].required
    assert tasks.run_defaults("cxr14-synthetic") == {"epochs": 3, "batch_size": 64}


def test_fourteen_findings_in_order(suite: tasks.TaskSuite) -> None:
    assert suite.task_names == (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
        "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
    )


def test_splits_are_patient_disjoint_and_sized(suite: tasks.TaskSuite) -> None:
    patients = {split: set(suite.patient_ids(split)) for split in ("train", "val", "test")}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    sizes = {split: len(dataset) for split, dataset in suite.splits().items()}
    assert sizes == {"train": 490, "val": 70, "test": 140}


def test_labels_are_the_real_table_rows(suite: tasks.TaskSuite) -> None:
    metadata = load_metadata()
    row_of = {name: i for i, name in enumerate(metadata.image_ids)}
    ids = suite.item_ids("test")
    labels = suite.labels("test").numpy()
    for k in range(0, len(ids), 17):
        assert np.array_equal(labels[k], metadata.labels[row_of[ids[k]]])


def test_every_finding_has_positives_in_every_split(suite: tasks.TaskSuite) -> None:
    for split in ("train", "val", "test"):
        assert (suite.labels(split).sum(dim=0) >= 5).all(), split


def test_prevalence_follows_the_real_table() -> None:
    big = tasks.create("cxr14-synthetic", n_images=4000, image_size=16)
    prevalence = dict(zip(FINDINGS, big.prevalence()))
    assert max(prevalence, key=prevalence.get) == "Infiltration"
    assert prevalence["Infiltration"] == pytest.approx(0.177, abs=0.03)  # 19,894 of 112,120 in the table
    assert prevalence["Effusion"] > prevalence["Pneumonia"] > prevalence["Hernia"]


def test_same_data_seed_same_data_other_seed_other_data(suite: tasks.TaskSuite) -> None:
    again = tasks.create("cxr14-synthetic", **SMALL)
    other = tasks.create("cxr14-synthetic", **SMALL, data_seed=1)
    x0, y0 = suite.splits()["train"][0]
    x1, y1 = again.splits()["train"][0]
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert suite.item_ids("train") == again.item_ids("train")
    assert suite.item_ids("train") != other.item_ids("train")
    assert suite.identity() == again.identity()
    assert suite.identity()["splits"]["train"]["sha256"] != other.identity()["splits"]["train"]["sha256"]


def test_items_are_grayscale_images_and_label_vectors(suite: tasks.TaskSuite) -> None:
    x, y = suite.splits()["val"][3]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (14,) and set(y.unique().tolist()) <= {0.0, 1.0}


def test_findings_plant_a_visible_signal() -> None:
    """The mean image of positives differs from that of negatives, most for the easiest finding."""
    big = tasks.create("cxr14-synthetic", n_images=3000, image_size=16)
    dataset = big.splits()["train"]
    images = dataset.images.to(torch.float32) / 255
    labels = big.labels("train").bool()
    gap = {}
    for t, name in enumerate(FINDINGS):
        gap[name] = (images[labels[:, t]].mean(0) - images[~labels[:, t]].mean(0)).abs().max().item()
    assert gap["Emphysema"] > 2 * gap["Infiltration"]
    assert gap["Cardiomegaly"] > gap["Nodule"]


def test_model_shape_and_gradients_reach_encoder_and_heads(suite: tasks.TaskSuite) -> None:
    model = suite.build_model("resnet18")
    x = torch.stack([suite.splits()["train"][i][0] for i in range(4)])
    logits = model(x)
    assert logits.shape == (4, 14)
    y = torch.stack([suite.splits()["train"][i][1] for i in range(4)])
    suite.losses(logits, y).sum().backward()
    assert all(p.grad is not None for p in model.shared_parameters())
    assert all(head.weight.grad is not None and head.weight.grad.abs().sum() > 0 for head in model.heads)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.encoder.parameters()}


def test_unknown_backbone_lists_valid_ones(suite: tasks.TaskSuite) -> None:
    with pytest.raises(ValueError, match="resnet18, resnet50, densenet121"):
        suite.build_model("vgg")


def test_losses_are_per_task_bce(suite: tasks.TaskSuite) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 14)
    targets = (torch.rand(8, 14) < 0.3).float()
    losses = suite.losses(logits, targets)
    expected = torch.stack(
        [F.binary_cross_entropy_with_logits(logits[:, t], targets[:, t]) for t in range(14)]
    )
    torch.testing.assert_close(losses, expected)
    assert suite.correct(logits, targets).tolist() == ((logits >= 0) == (targets == 1)).sum(0).float().tolist()


def test_metrics_agree_with_scikit_learn(suite: tasks.TaskSuite) -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 14)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(60, 14)).astype(np.float32) + 1.5 * targets
    metrics = suite.evaluate(torch.from_numpy(logits), torch.from_numpy(targets))
    probabilities = 1 / (1 + np.exp(-logits.astype(np.float64)))
    for t, name in enumerate(FINDINGS):
        assert metrics[f"auroc/{name}"] == pytest.approx(roc_auc_score(targets[:, t], probabilities[:, t]))
        assert metrics[f"accuracy/{name}"] == pytest.approx(accuracy_score(targets[:, t], probabilities[:, t] >= 0.5))
        assert metrics[f"f1/{name}"] == pytest.approx(f1_score(targets[:, t], probabilities[:, t] >= 0.5))
    assert metrics["mean_auroc"] == pytest.approx(np.mean([metrics[f"auroc/{n}"] for n in FINDINGS]))


def test_single_class_task_has_nan_auroc_left_out_of_the_mean(suite: tasks.TaskSuite) -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((40, 14)) < 0.5).astype(np.float32)
    targets[:, 13] = 0  # no Hernia positive
    logits = rng.normal(size=(40, 14)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = suite.evaluate(torch.from_numpy(logits), torch.from_numpy(targets))
    assert any(issubclass(w.category, UndefinedMetricWarning) and "Hernia" in str(w.message) for w in caught)
    assert math.isnan(metrics["auroc/Hernia"])
    assert metrics["mean_auroc"] == pytest.approx(np.mean([metrics[f"auroc/{n}"] for n in FINDINGS[:13]]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_images": 100}, "n_images"),
        ({"image_size": 8}, "image_size"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
        ({"signal_scale": 0}, "signal_scale"),
        ({"min_positives": 0}, "min_positives"),
    ],
)
def test_bad_options_name_the_option_and_range(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tasks.create("cxr14-synthetic", **options)
