"""Every command answers bad input with one line naming the fix and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from tasks import nyuv2

SMALL_CXR = ["--task", "cxr14-synthetic", "--task-opt", "n_images=700", "--batch-size", "8"]
"""A cxr14-synthetic suite that builds in seconds."""


def assert_clear_error(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """``main(argv)`` exits with 2 and prints every fragment (line breaks ignored) and no traceback;
    returns what it printed, line breaks as spaces."""
    code = main(argv)
    captured = capsys.readouterr()
    printed = " ".join(captured.out.split())
    assert code == 2, printed
    for fragment in fragments:
        assert fragment in printed
    assert "Traceback" not in captured.out + captured.err
    return printed


def command_options(command: str, results: Path) -> list[str]:
    """What ``run``, ``profile`` or ``tune`` needs besides the run options: a results folder, a trial budget."""
    return {"run": ["--results", str(results)], "profile": [], "tune": ["--trials", "1", "--results", str(results)]}[command]


@pytest.fixture
def no_medmnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import medmnist`` fails as it does where the optional package is not installed."""
    monkeypatch.setitem(sys.modules, "medmnist", None)


@pytest.mark.parametrize("command", ["run", "profile", "tune"])
def test_libmtl_methods_at_feature_level_are_refused_up_front(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, *SMALL_CXR, "--methods", "ew,libmtl:mgda", "--grad-level", "features", *command_options(command, tmp_path)]
    assert_clear_error(argv, capsys, "LibMTL's own classes (libmtl:mgda)", "use --grad-level parameters")


@pytest.mark.parametrize("command", ["run", "profile", "tune"])
@pytest.mark.parametrize(
    ("task", "backbone", "valid"),
    [("cxr14-synthetic", "nosuch", "resnet18, resnet50, densenet121"), ("nyuv2-synthetic", "densenet121", "resnet18, resnet50")],
)
def test_a_backbone_the_suite_cannot_build_is_refused_before_training(
    command: str, task: str, backbone: str, valid: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--task", task, "--methods", "ew", "--backbone", backbone, *command_options(command, tmp_path)]
    assert_clear_error(argv, capsys, f"--backbone '{backbone}': the {task} suite builds on {valid}")
    assert not (tmp_path / "mlflow.db").exists()  # no run was started


@pytest.mark.parametrize("command", ["run", "profile", "tune"])
def test_chestmnist_download_without_medmnist_says_how_to_install_it(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_medmnist: None
) -> None:
    argv = [command, "--task", "chestmnist", "--task-opt", "download=true", "--task-opt", f"data_dir={tmp_path}",
            "--methods", "ew"]
    if command != "profile":
        argv += ["--results", str(tmp_path / "results")]
    if command == "tune":
        argv += ["--trials", "1"]
    assert_clear_error(argv, capsys, 'pip install -e ".[chestmnist]"', "download chestmnist.npz from")


def test_nyuv2_without_a_data_folder_names_the_flag_and_the_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no data/nyuv2 here
    argv = ["run", "--task", "nyuv2", "--methods", "ew", "--results", str(tmp_path)]
    assert_clear_error(argv, capsys, "--data-dir DIR", nyuv2.DOWNLOAD_URL)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--methods", "nosuch"], "unknown method 'nosuch'; valid:"),
        (["--device", "foo"], "--device 'foo': expected cpu, cuda or cuda:N"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_profile_bad_input(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(["profile", *SMALL_CXR, *argv], capsys, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_profile_on_cuda_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(["profile", *SMALL_CXR, "--device", "cuda"], capsys, "CUDA is not available", "--device cpu")


def test_profile_passes_image_size_only_to_suites_that_take_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # chestmnist has no image_size option: the error is about its missing file, not about an
    # option the user never gave.
    argv = ["profile", "--task", "chestmnist", "--task-opt", f"data_dir={tmp_path}", "--methods", "ew"]
    assert_clear_error(argv, capsys, "chestmnist.npz does not exist")


def test_report_on_an_empty_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(["report", "--results", str(tmp_path)], capsys, "train first (python -m bench run)")


def test_report_on_an_unreachable_tracking_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    argv = ["report", "--results", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9"]
    assert_clear_error(
        argv, capsys, "the MLflow tracking server http://127.0.0.1:9 failed at the first request", "that the server is running"
    )


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--task", "nosuch"], "unknown task suite 'nosuch'; valid names:"),
        (["--task", "cxr14-synthetic", "--hp", "ew"], "--hp 'ew': expected KEY=VALUE"),
        (["--task", "cxr14-synthetic", "--task-opt", "nosuch=1"], "unknown option(s) ['nosuch']"),
        (["--task", "cxr14", "--data-dir", "/no/such/folder"], "pass --data-dir DIR"),
    ],
)
def test_tune_bad_input(argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(["tune", "--trials", "1", "--methods", "ew", "--results", str(tmp_path), *argv], capsys, fragment)


def test_worker_on_an_unknown_storage_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(["worker", "--storage", "nosuch://host/db"], capsys, "storage nosuch://host/db")


@pytest.mark.parametrize(
    ("storage", "fragment"),
    [
        ("postgres://bench:secret@localhost/optuna", "not 'postgres': use postgresql://bench:***@localhost/optuna"),
        ("postgresql://bench:secret@localhost:54x2/optuna", "the port in 'localhost:54x2' is not a number"),
        ("mysql+pymysql://bench:secret@localhost/optuna", "the database driver 'pymysql' is not installed; pip install pymysql"),
    ],
)
def test_a_storage_url_that_cannot_work_says_how_to_write_it(
    storage: str, fragment: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pymysql", None)  # as where PyMySQL is not installed
    printed = assert_clear_error(["worker", "--storage", storage], capsys, fragment)
    assert "secret" not in printed
