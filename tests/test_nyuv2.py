"""NYUv2 suites: metrics on hand-computed cases, losses, loader and its errors, augmentation, models, CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import jaccard_score
from torchvision import models
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

import methods
import tasks
from bench.cli import main
from bench.runner import summary_files
from bench.spec import resolve_spec
from bench.train import make_scheduler
from tasks import nyuv2, nyuv2_synthetic
from tasks.dense_models import build_dense_model, build_dilated_encoder, dilate_stage

TINY = {"n_train": 8, "n_test": 4, "image_size": 12}
"""12 x 16 images: 8 in train/ (6 train + 2 val), 4 in val/ (test)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nyuv2-synthetic")


@pytest.fixture(scope="module")
def suite(data_dir: Path) -> nyuv2.NYUv2FormatSuite:
    return tasks.create("nyuv2-synthetic", data_dir=str(data_dir), **TINY)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A fresh, valid 12 x 16 data set in the NYUv2 layout (4 train, 2 val images), to break."""
    nyuv2_synthetic.write_dataset(tmp_path / "nyu", {"train": 4, "val": 2}, 12, 16, data_seed=0)
    return tmp_path / "nyu"


def dense_batch(segmentation: torch.Tensor, depth: torch.Tensor, normal: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"segmentation": segmentation, "depth": depth, "normal": normal}


# ---------------------------------------------------------------- metrics, by hand


def test_miou_and_pixel_accuracy_by_hand(suite: nyuv2.NYUv2FormatSuite) -> None:
    # (true, predicted) over labelled pixels: (0,0) (0,1) (1,1) (1,2) (2,2); one pixel unlabelled.
    # IoU: class 0 = 1/(1+0+1), class 1 = 1/(1+1+1), class 2 = 1/(1+1+0); classes 3..12 absent.
    labels = torch.tensor([[[0, 0, 1], [1, 2, -1]]])
    predicted = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    confusion = nyuv2.confusion_matrix(predicted, labels)
    assert confusion.sum() == 5 and confusion[0, 1] == 1 and confusion[1, 2] == 1
    scores = nyuv2.segmentation_scores(confusion)
    assert scores["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)


def test_a_class_predicted_but_never_labelled_counts_with_iou_zero() -> None:
    scores = nyuv2.segmentation_scores(nyuv2.confusion_matrix(torch.tensor([[0, 5]]), torch.tensor([[0, 0]])))
    assert scores["miou"] == pytest.approx((1 / 2 + 0) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(1 / 2)


def test_miou_matches_scikit_learn_on_random_maps() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 13, (3, 20, 30), generator=generator)
    labels[labels == 7] = 3  # class 7 then occurs in the predictions only
    predicted = torch.randint(0, 12, (3, 20, 30), generator=generator)  # class 12 never predicted
    labelled = labels >= 0
    truth, guess = labels[labelled].numpy(), predicted[labelled].numpy()
    confusion = nyuv2.confusion_matrix(predicted, labels)
    np.testing.assert_array_equal(confusion.numpy(), sklearn_confusion_matrix(truth, guess, labels=range(13)))
    occurring = np.union1d(truth, guess)  # 12 classes: 7 only predicted, 12 only labelled
    assert len(occurring) == 13
    reference = jaccard_score(truth, guess, labels=occurring, average="macro")
    assert nyuv2.segmentation_scores(confusion)["miou"] == pytest.approx(reference)


def test_depth_errors_by_hand() -> None:
    # Valid pixels (target != 0): (2 vs 1), (4 vs 4), (5 vs 4).
    # abs = (1 + 0 + 1) / 3; rel = (1/1 + 0 + 1/4) / 3; ratio < 1.25: only 4 vs 4 (5/4 = 1.25 is not below).
    predicted = torch.tensor([[[[2.0, 4.0], [1.0, 5.0]]]])
    target = torch.tensor([[[[1.0, 4.0], [0.0, 4.0]]]])
    scores = nyuv2.depth_scores(nyuv2.depth_error_sums(predicted, target))
    assert scores["abs_err"] == pytest.approx(2 / 3)
    assert scores["rel_err"] == pytest.approx(1.25 / 3)
    assert scores["delta_1.25"] == pytest.approx(1 / 3)


def test_depth_ratio_treats_nonpositive_predictions_and_missing_targets_as_outside() -> None:
    predicted = torch.tensor([-1.0, 0.0, 1.1, 0.9, 1.0])
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    assert nyuv2.depth_within_ratio(predicted, target).tolist() == [False, False, True, True, False]


def normal_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Five pixels: angle errors 0, 45, 90, (no target), 20 degrees; predictions not unit length."""
    angle = math.radians(20.0)
    target = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.float32)
    predicted = torch.tensor(
        [[0, 0, 2], [3, 3, 0], [0, 0, 5], [1, 2, 3], [math.sin(angle), 0, math.cos(angle)]], dtype=torch.float32
    )
    return predicted.T.reshape(1, 3, 1, 5), target.T.reshape(1, 3, 1, 5)


def test_normal_angle_metrics_by_hand() -> None:
    predicted, target = normal_case()
    errors = nyuv2.angle_errors(predicted, target)[nyuv2.normal_valid(target)]
    np.testing.assert_allclose(errors.numpy(), [0.0, 45.0, 90.0, 20.0], atol=1e-3)
    scores = nyuv2.normal_scores(errors.numpy())
    assert scores["mean_angle"] == pytest.approx(155 / 4, abs=1e-3)
    assert scores["median_angle"] == pytest.approx((20 + 45) / 2, abs=1e-3)  # even count: mean of the middle two
    assert (scores["within_11.25"], scores["within_22.5"], scores["within_30"]) == (0.25, 0.5, 0.5)


def test_evaluate_assembles_every_metric_and_the_primary_one(suite: nyuv2.NYUv2FormatSuite) -> None:
    normal_predicted, normal_target = normal_case()
    outputs = dense_batch(
        torch.tensor([[[0, 1, 1, 2, 2]]]), torch.tensor([[[[2.0, 4.0, 1.0, 5.0, 1.0]]]]), normal_predicted
    )
    targets = dense_batch(
        torch.tensor([[[0, 0, 1, 1, 2]]]), torch.tensor([[[[1.0, 4.0, 0.0, 4.0, 0.0]]]]), normal_target
    )
    metrics = suite.evaluate(outputs, targets)
    assert set(metrics) == set(suite.metric_directions())
    assert metrics["pixel_accuracy/segmentation"] == pytest.approx(3 / 5)
    assert metrics["abs_err/depth"] == pytest.approx(2 / 3)
    assert metrics["median_angle/normal"] == pytest.approx(32.5, abs=1e-3)
    assert metrics["mean_accuracy"] == pytest.approx((3 / 5 + 1 / 3 + 1 / 4) / 3, abs=1e-6)


def test_evaluation_record_keeps_the_metrics_of_the_raw_outputs(suite: nyuv2.NYUv2FormatSuite) -> None:
    generator = torch.Generator().manual_seed(1)
    n = 20  # more than one evaluation chunk
    outputs = dense_batch(
        torch.randn(n, 13, 4, 5, generator=generator),
        torch.rand(n, 1, 4, 5, generator=generator) * 3,
        torch.randn(n, 3, 4, 5, generator=generator),
    )
    targets = dense_batch(
        torch.randint(-1, 13, (n, 4, 5), generator=generator),
        torch.rand(n, 1, 4, 5, generator=generator) * 3 + 0.5,
        F.normalize(torch.randn(n, 3, 4, 5, generator=generator), dim=1),
    )
    kept_outputs, kept_targets = suite.evaluation_record(outputs, targets)
    assert kept_outputs["segmentation"].dtype == torch.int8 and kept_outputs["segmentation"].shape == (n, 4, 5)
    assert suite.evaluate(kept_outputs, kept_targets) == pytest.approx(suite.evaluate(outputs, targets))


# ---------------------------------------------------------------- losses and training accuracy


def test_losses_by_hand(suite: nyuv2.NYUv2FormatSuite) -> None:
    normal_predicted, normal_target = normal_case()
    outputs = dense_batch(
        torch.zeros(1, 13, 1, 5, requires_grad=True), torch.tensor([[[[2.0, 4.0, 1.0, 5.0, 1.0]]]]), normal_predicted
    )
    targets = dense_batch(
        torch.tensor([[[3, 0, -1, 12, 5]]]), torch.tensor([[[[1.0, 4.0, 0.0, 4.0, 0.0]]]]), normal_target
    )
    losses = suite.losses(outputs, targets)
    cosines = [1.0, math.cos(math.radians(45)), 0.0, math.cos(math.radians(20))]
    expected = [math.log(13), 2 / 3, 1 - sum(cosines) / 4]  # equal logits: cross-entropy log(13)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-5)
    losses.sum().backward()
    assert outputs["segmentation"].grad[0, :, 0, 2].abs().sum() == 0  # the unlabelled pixel adds nothing


def test_losses_are_zero_not_nan_without_valid_pixels(suite: nyuv2.NYUv2FormatSuite) -> None:
    outputs = dense_batch(torch.randn(1, 13, 2, 2), torch.rand(1, 1, 2, 2), torch.randn(1, 3, 2, 2))
    targets = dense_batch(torch.full((1, 2, 2), -1), torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 2, 2))
    assert suite.losses(outputs, targets).tolist() == [0.0, 0.0, 0.0]


def test_correct_sums_per_image_accuracies(suite: nyuv2.NYUv2FormatSuite) -> None:
    # Image 1: 2 of 3 labelled pixels right; depth 1 of 2 valid within 1.25; normals 1 of 2 within 11.25 deg.
    # Image 2: 1 of 1 labelled pixel right; no valid depth (scores 0); normals 0 of 1 within.
    predicted_classes = torch.tensor([[[0, 1, 2, 4]], [[3, 3, 3, 3]]])
    labels = torch.tensor([[[0, 1, 1, -1]], [[3, -1, -1, -1]]])
    up, side = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
    normal_target = torch.stack([torch.stack([up, up, torch.zeros(3), torch.zeros(3)], 1),
                                 torch.stack([up, torch.zeros(3), torch.zeros(3), torch.zeros(3)], 1)])[:, :, None]
    normal_predicted = torch.stack([torch.stack([up, side, up, up], 1), torch.stack([side, up, up, up], 1)])[:, :, None]
    outputs = dense_batch(
        F.one_hot(predicted_classes, 13).permute(0, 3, 1, 2).float(),
        torch.tensor([[[[1.0, 2.0, 1.0, 1.0]]], [[[1.0, 1.0, 1.0, 1.0]]]]),
        normal_predicted,
    )
    targets = dense_batch(labels, torch.tensor([[[[1.1, 1.0, 0.0, 0.0]]], [[[0.0, 0.0, 0.0, 0.0]]]]), normal_target)
    np.testing.assert_allclose(suite.correct(outputs, targets).numpy(), [2 / 3 + 1, 1 / 2 + 0, 1 / 2 + 0])


def test_bad_batches_are_rejected_with_the_expected_keys(suite: nyuv2.NYUv2FormatSuite) -> None:
    with pytest.raises(ValueError, match=r"outputs must be a dict with the keys \['segmentation', 'depth', 'normal'\]"):
        suite.losses([torch.zeros(1)], {})


# ---------------------------------------------------------------- directions, task metrics, options


def test_directions_and_task_metrics_follow_libmtl(suite: nyuv2.NYUv2FormatSuite) -> None:
    directions = suite.metric_directions()
    assert suite.task_metrics() == {
        "segmentation": ("miou/segmentation", "pixel_accuracy/segmentation"),
        "depth": ("abs_err/depth", "rel_err/depth"),
        "normal": ("mean_angle/normal", "median_angle/normal", "within_11.25/normal", "within_22.5/normal",
                   "within_30/normal"),
    }
    lower_better = {key for key, direction in directions.items() if direction == "minimize"}
    assert lower_better == {"abs_err/depth", "rel_err/depth", "mean_angle/normal", "median_angle/normal"}
    assert directions[suite.primary_metric] == suite.primary_direction == "maximize"


def test_nyuv2_run_defaults_are_libmtls_training_setup() -> None:
    assert tasks.run_defaults("nyuv2") == {
        "epochs": 200, "batch_size": 8, "lr": 1e-4, "weight_decay": 1e-5, "optimizer": "adam",
        "scheduler": "step", "backbone": "resnet50",
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"val_fraction": 1.5}, r"val_fraction must be a number in the open interval \(0.0, 1.0\)"),
        ({"val_fraction": 0.01}, "gives 0 validation images"),
        ({"image_size": 13}, "image_size must be a multiple of 3"),
        ({"augment": "yes"}, "augment must be true or false"),
    ],
)
def test_bad_options_name_the_option(data_dir: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tasks.create("nyuv2-synthetic", data_dir=str(data_dir), **{**TINY, **options})


def test_pretrained_must_be_none_imagenet_or_a_file(layout: Path) -> None:
    with pytest.raises(ValueError, match="pretrained must be none, imagenet or the path of an existing weights file"):
        tasks.create("nyuv2", data_dir=str(layout), pretrained="/no/such/weights.pth")


# ---------------------------------------------------------------- data: layout, loader, splits


def test_files_have_the_libmtl_layout_and_items_are_channels_first(suite: nyuv2.NYUv2FormatSuite) -> None:
    root = suite.root
    raw = {m: np.load(root / "val" / m / "2.npy") for m in nyuv2.MODALITIES}
    assert {m: a.shape for m, a in raw.items()} == {
        "image": (12, 16, 3), "label": (12, 16), "depth": (12, 16, 1), "normal": (12, 16, 3)
    }
    image, targets = suite.splits()["test"][2]
    np.testing.assert_array_equal(image.numpy(), raw["image"].transpose(2, 0, 1))
    np.testing.assert_array_equal(targets["segmentation"].numpy(), raw["label"])
    np.testing.assert_array_equal(targets["depth"].numpy(), raw["depth"].transpose(2, 0, 1))
    np.testing.assert_array_equal(targets["normal"].numpy(), raw["normal"].transpose(2, 0, 1))
    assert targets["segmentation"].dtype == torch.int64
    valid = targets["depth"][0] != 0
    assert (targets["depth"][0][valid] >= 0.5).all() and 0 < valid.float().mean() < 1
    norms = targets["normal"].norm(dim=0)
    torch.testing.assert_close(norms[valid], torch.ones_like(norms[valid]))
    assert set(targets["segmentation"].unique().tolist()) <= set(range(-1, 13))


def test_splits_carve_validation_from_train_and_test_on_the_val_folder(suite: nyuv2.NYUv2FormatSuite) -> None:
    ids = {split: suite.item_ids(split) for split in tasks.SPLIT_NAMES}
    assert {split: len(v) for split, v in ids.items()} == {"train": 6, "val": 2, "test": 4}
    assert sorted(ids["train"] + ids["val"], key=lambda i: int(i.split("/")[1])) == [f"train/{i}" for i in range(8)]
    assert ids["test"] == [f"val/{i}" for i in range(4)]
    assert nyuv2.carve_validation(8, 0.25, 0) == nyuv2.carve_validation(8, 0.25, 0)
    assert nyuv2.carve_validation(100, 0.1, 0) != nyuv2.carve_validation(100, 0.1, 1)


def test_generation_is_deterministic_and_each_image_depends_only_on_seed_folder_and_number(tmp_path: Path) -> None:
    nyuv2_synthetic.write_dataset(tmp_path / "a", {"train": 3, "val": 1}, 12, 16, data_seed=0)
    nyuv2_synthetic.write_dataset(tmp_path / "b", {"train": 5, "val": 2}, 12, 16, data_seed=0)
    nyuv2_synthetic.write_dataset(tmp_path / "c", {"train": 3, "val": 1}, 12, 16, data_seed=1)
    for modality in nyuv2.MODALITIES:
        for file in (f"train/{modality}/2.npy", f"val/{modality}/0.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "a" / file), np.load(tmp_path / "b" / file))
    assert not np.array_equal(np.load(tmp_path / "a/train/image/0.npy"), np.load(tmp_path / "c/train/image/0.npy"))


def test_the_generated_set_is_reused_from_its_cache_folder(data_dir: Path, suite: nyuv2.NYUv2FormatSuite) -> None:
    marker = suite.root / "train" / "image" / "0.npy"
    stamp = marker.stat().st_mtime_ns
    again = tasks.create("nyuv2-synthetic", data_dir=str(data_dir), **TINY)
    assert again.root == suite.root and marker.stat().st_mtime_ns == stamp
    assert [p.name for p in data_dir.iterdir()] == [suite.root.name]  # no partial folder left behind


def test_missing_data_folder_says_where_to_get_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"no NYUv2 folder at {tmp_path / 'nope'}: download")) as raised:
        tasks.create("nyuv2", data_dir=str(tmp_path / "nope"))
    assert nyuv2.DOWNLOAD_URL in str(raised.value) and "--data-dir DIR" in str(raised.value)
    monkeypatch.chdir(tmp_path)  # without data_dir: the default folder, absent here
    with pytest.raises(FileNotFoundError, match=re.escape(f"no NYUv2 folder at {nyuv2.DEFAULT_DATA_DIR}: download")):
        tasks.create("nyuv2")


def test_data_folder_without_train_names_it_and_the_layout(tmp_path: Path) -> None:
    expected = re.escape(f"{tmp_path / 'train'} does not exist; expected the NYUv2 layout")
    with pytest.raises(FileNotFoundError, match=expected):
        tasks.create("nyuv2", data_dir=str(tmp_path))


def test_missing_modality_folder_is_named(layout: Path) -> None:
    shutil.rmtree(layout / "train" / "depth")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{layout / 'train' / 'depth'} does not exist")):
        nyuv2.check_folder(layout / "train", (12, 16), None)


def test_missing_file_is_named_with_what_was_expected(layout: Path) -> None:
    (layout / "val" / "normal" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/normal/1.npy is missing .*holds 2 images, so every folder needs 0.npy ... 1.npy"):
        nyuv2.check_folder(layout / "val", (12, 16), None)


def test_extra_or_badly_named_files_are_named(layout: Path) -> None:
    shutil.copy(layout / "train" / "label" / "0.npy", layout / "train" / "label" / "7.npy")
    with pytest.raises(ValueError, match=r"train/label/7.npy is unexpected"):
        nyuv2.check_folder(layout / "train", (12, 16), None)
    (layout / "train" / "label" / "7.npy").rename(layout / "train" / "label" / "seven.npy")
    with pytest.raises(ValueError, match=r"seven.npy: expected files named <i>.npy"):
        nyuv2.check_folder(layout / "train", (12, 16), None)


def test_wrong_shape_is_named_with_the_expected_shape(layout: Path) -> None:
    np.save(layout / "train" / "depth" / "3.npy", np.ones((12, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"train/depth/3.npy has shape \(12, 16\); expected \(12, 16, 1\)"):
        nyuv2.check_folder(layout / "train", (12, 16), None)


def test_unreadable_file_is_named(layout: Path) -> None:
    (layout / "train" / "image" / "1.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"train/image/1.npy is not a readable .npy array"):
        nyuv2.check_folder(layout / "train", (12, 16), None)


def test_gap_in_the_numbering_is_named(layout: Path) -> None:
    for modality in nyuv2.MODALITIES:  # 0, 1, 3 in every folder: complete but for the gap
        (layout / "train" / modality / "2.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"train/image/2.npy is missing, a gap in the numbering"):
        nyuv2.check_folder(layout / "train", (12, 16), None)


def test_real_suite_accepts_other_image_counts_and_warns_they_are_not_comparable(tmp_path: Path) -> None:
    nyuv2_synthetic.write_dataset(tmp_path / "nyu", {"train": 4, "val": 2}, *nyuv2.IMAGE_SIZE, data_seed=0)
    expected = r"holds 4 train/ and 2 val/ images; .* on the 795 train/ and 654 val/ images .* not comparable"
    with pytest.warns(nyuv2.FolderSizeWarning, match=expected):
        suite = tasks.create("nyuv2", data_dir=str(tmp_path / "nyu"), val_fraction=0.25)
    assert {split: len(suite.item_ids(split)) for split in tasks.SPLIT_NAMES} == {"train": 3, "val": 1, "test": 2}
    image, targets = suite.splits()["test"][1]
    assert image.shape == (3, *nyuv2.IMAGE_SIZE) and targets["normal"].shape == (3, *nyuv2.IMAGE_SIZE)


def test_real_suite_refuses_a_modality_with_another_count(tmp_path: Path) -> None:
    nyuv2_synthetic.write_dataset(tmp_path / "nyu", {"train": 4, "val": 2}, *nyuv2.IMAGE_SIZE, data_seed=0)
    (tmp_path / "nyu" / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/depth/1.npy is missing .*val/image holds 2 images"):
        tasks.create("nyuv2", data_dir=str(tmp_path / "nyu"), val_fraction=0.25)


def test_label_values_outside_the_classes_are_named_when_read(layout: Path) -> None:
    label = np.load(layout / "train" / "label" / "0.npy")
    label[0, 0] = 13
    np.save(layout / "train" / "label" / "0.npy", label)
    dataset = nyuv2.NYUv2Dataset(layout / "train", [0])
    with pytest.raises(ValueError, match=r"train/label/0.npy holds label values \[13.0\]; expected -1"):
        dataset[0]


# ---------------------------------------------------------------- augmentation


def item() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(3, 12, 16, generator=generator)
    label = torch.arange(16).repeat(12, 1) // 2  # classes 0 ... 7, rising from left to right
    depth = torch.full((1, 12, 16), 3.0)
    normal = F.normalize(torch.randn(3, 12, 16, generator=generator), dim=0)
    return image, {"segmentation": label, "depth": depth, "normal": normal}


def test_flip_mirrors_every_map_and_negates_the_normals_x() -> None:
    image, targets = item()
    flipped_image, flipped = nyuv2.scale_crop_flip(image, targets, scale=1.0, top=0, left=0, flip=True)
    torch.testing.assert_close(flipped_image, image.flip(-1))
    assert torch.equal(flipped["segmentation"], targets["segmentation"].flip(-1))
    torch.testing.assert_close(flipped["normal"][0], -targets["normal"][0].flip(-1))
    torch.testing.assert_close(flipped["normal"][1:], targets["normal"][1:].flip(-1))


def test_scale_crops_resizes_back_and_divides_depth() -> None:
    image, targets = item()
    # Scale 1.5 on 12 x 16: a crop of 8 x 10 pixels at rows 2..9, columns 5..14.
    scaled_image, scaled = nyuv2.scale_crop_flip(image, targets, scale=1.5, top=2, left=5, flip=False)
    assert scaled_image.shape == (3, 12, 16) and scaled["segmentation"].shape == (12, 16)
    torch.testing.assert_close(scaled["depth"], torch.full((1, 12, 16), 2.0))
    torch.testing.assert_close(scaled_image[:, 0, 0], image[:, 2, 5])  # align_corners keeps the corners
    torch.testing.assert_close(scaled_image[:, -1, -1], image[:, 9, 14])
    assert scaled["segmentation"].dtype == torch.int64
    assert set(scaled["segmentation"].unique().tolist()) == set((torch.arange(5, 15) // 2).tolist())


def test_augment_draws_scales_and_flips_per_image_only_when_asked(data_dir: Path, suite: nyuv2.NYUv2FormatSuite) -> None:
    image, targets = item()
    batch = image.repeat(32, 1, 1, 1)
    batch_targets = {task: target.repeat(32, *[1] * target.dim()) for task, target in targets.items()}
    unchanged = suite.augment(batch, batch_targets)
    assert unchanged[0] is batch and unchanged[1] is batch_targets
    augmenting = tasks.create("nyuv2-synthetic", data_dir=str(data_dir), augment=True, **TINY)
    torch.manual_seed(0)
    augmented, augmented_targets = augmenting.augment(batch, batch_targets)
    assert augmented.shape == batch.shape
    depths = {round(float(d), 4) for d in augmented_targets["depth"][:, 0, 0, 0]}
    assert depths == {3.0, 2.5, 2.0}  # 3 / 1.0, 3 / 1.2, 3 / 1.5
    flipped = augmented_targets["segmentation"][:, 0, 0] > augmented_targets["segmentation"][:, 0, -1]
    assert 0 < int(flipped.sum()) < 32


# ---------------------------------------------------------------- models


def test_resnet18_dilation_matches_torchvisions_rule_on_resnet50() -> None:
    ours = models.resnet50()
    dilate_stage(ours.layer3, dilation=2, previous_dilation=1)
    dilate_stage(ours.layer4, dilation=4, previous_dilation=2)
    reference = models.resnet50(replace_stride_with_dilation=[False, True, True])
    convs = [(name, m) for name, m in ours.named_modules() if isinstance(m, torch.nn.Conv2d)]
    reference_convs = dict(reference.named_modules())
    for name, conv in convs:
        expected = reference_convs[name]
        assert (conv.stride, conv.dilation, conv.padding) == (expected.stride, expected.dilation, expected.padding), name


@pytest.mark.parametrize(("backbone", "channels"), [("resnet18", 512), ("resnet50", 2048)])
def test_dilated_encoders_have_output_stride_8(backbone: str, channels: int) -> None:
    encoder, feature_channels = build_dilated_encoder(backbone)
    assert feature_channels == channels
    with torch.no_grad():
        assert encoder.eval()(torch.zeros(1, 3, 24, 32)).shape == (1, channels, 3, 4)


def test_dense_model_upsamples_every_head_and_trains_encoder_and_heads() -> None:
    torch.manual_seed(0)
    model = build_dense_model(nyuv2.TASK_CHANNELS, "resnet18")
    assert all(isinstance(head, DeepLabHead) for head in model.heads)
    outputs = model(torch.rand(2, 3, 24, 32))
    assert {task: tuple(out.shape) for task, out in outputs.items()} == {
        "segmentation": (2, 13, 24, 32), "depth": (2, 1, 24, 32), "normal": (2, 3, 24, 32)
    }
    outputs["depth"].mean().backward()
    assert all(p.grad is not None for p in model.shared_parameters())
    with torch.no_grad():
        decoded, features = model.eval().forward_with_features(torch.rand(2, 3, 24, 32))
    assert features.shape == (2, 512, 3, 4) and decoded["normal"].shape == (2, 3, 24, 32)
    assert model.heads[1][0].convs[0][0].weight.grad is not None and model.heads[0][-1].weight.grad is None


def test_unknown_dense_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid backbones: resnet18, resnet50"):
        build_dilated_encoder("densenet121")


# ---------------------------------------------------------------- step scheduler and the CLI


def test_step_scheduler_halves_the_rate_every_step_size_epochs() -> None:
    spec = resolve_spec({}, {"task": "nyuv2-synthetic", "scheduler": "step", "lr": 0.1, "lr_step_size": 2,
                             "lr_gamma": 0.5, "device": "cpu"})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    scheduler = make_scheduler(spec, optimizer)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    with pytest.raises(ValueError, match=r"--lr-gamma: expected a number in \(0, 1\]"):
        resolve_spec({}, {"task": "nyuv2-synthetic", "lr_gamma": 2.0, "device": "cpu"})


def test_every_method_runs_end_to_end_from_the_cli(tmp_path: Path, data_dir: Path) -> None:
    results = tmp_path / "results"
    code = main([
        "run", "--methods", "all,libmtl:mgda", "--task", "nyuv2-synthetic", "--data-dir", str(data_dir),
        "--task-opt", "n_train=8", "--task-opt", "n_test=4", "--image-size", "12", "--task-opt", "augment=true",
        "--batch-size", "4", "--epochs", "1", "--scheduler", "step", "--no-checkpoint", "--device", "cpu",
        "--results", str(results),
    ])
    assert code == 0
    summary = json.loads(summary_files(results, "nyuv2-synthetic")[-1].with_suffix(".json").read_text())
    runs = {run["method"]: run for run in summary["runs"]}
    assert set(runs) == {*methods.available(), "libmtl:mgda"}
    expected_keys = set(tasks.create("nyuv2-synthetic", data_dir=str(data_dir), **TINY).metric_directions())
    for method, run in runs.items():
        assert run["status"] == "FINISHED", (method, run["reason"])
        assert set(run["test"]) == expected_keys
        assert all(math.isfinite(value) for value in run["test"].values()), method
        assert 0.0 <= run["test"]["mean_accuracy"] <= 1.0



def test_the_generated_set_lives_in_a_private_per_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    suite = tasks.create("nyuv2-synthetic", **TINY)
    base = tmp_path / "cache" / "mtl-weighting-bench" / "nyuv2-synthetic"
    assert suite.config()["data_dir"] == str(base) and suite.root.parent == base
    assert base.stat().st_mode & 0o777 == 0o700 and suite.root.stat().st_mode & 0o777 == 0o700

    suite.root.chmod(0o770)  # group-writable: someone else could have swapped its data
    with pytest.raises(ValueError, match=re.escape(f"{suite.root} is not private to this user")):
        tasks.create("nyuv2-synthetic", **TINY)
    suite.root.chmod(0o700)
    assert tasks.create("nyuv2-synthetic", **TINY).root == suite.root
    monkeypatch.setattr(nyuv2_synthetic.os, "getuid", lambda: suite.root.stat().st_uid + 1)  # another user's
    with pytest.raises(ValueError, match="not private to this user .*Delete it"):
        tasks.create("nyuv2-synthetic", **TINY)
