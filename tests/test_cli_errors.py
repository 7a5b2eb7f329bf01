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


TINY_RUN = ["--task", "cxr14-synthetic", "--task-opt", "n_images=140", "--task-opt", "min_positives=1",
            "--image-size", "16", "--methods", "ew", "--epochs", "1", "--device", "cpu"]
"""A run of one method and one short epoch: what a value accepted today would train."""


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--lr", "inf"], "--lr: expected a finite number, got inf"),
        (["--weight-decay", "nan"], "--weight-decay: expected a finite number, got nan"),
        (["--seeds", "99999999999999999999"], f"--seeds: 99999999999999999999 is out of range; a seed is a whole number "
                                              f"from 0 to {2**32 - 1}"),
        (["--batch-size", "1"], "--batch-size 1: every backbone normalises with BatchNorm"),
    ],
)
def test_a_run_value_that_would_fail_later_is_refused_before_anything_is_written(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    assert_clear_error(["run", *TINY_RUN, *argv, "--results", str(results)], capsys, fragment)
    assert not results.exists()


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("c.yaml", 'save_checkpoint: "no"\n', "save_checkpoint: expected true or false (unquoted in YAML and TOML), got 'no'"),
        ("c.yaml", 'amp: "false"\n', "amp: expected true or false (unquoted in YAML and TOML), got 'false'"),
        ("c.toml", 'save_checkpoint = "no"\n', "save_checkpoint: expected true or false"),
        ("c.yaml", "seeds: [0, 1.7]\n", "--seeds: 1.7 is not a whole number"),
        ("c.yaml", "batch-size: 16\nbatch_size: 32\n", "{path} gives batch_size twice, as batch-size and batch_size: keep one"),
        ("c.yaml", "epochs: [1\n", "config file {path} is not valid YAML: line 2, column 1"),
        ("c.yaml", "1: 2\n", "config file {path}: 1 is not an option name"),
        ("c.toml", "epochs = \n", "config file {path} is not valid TOML: Invalid value (at line 1"),
    ],
)
def test_a_config_file_is_read_strictly_and_refused_with_its_name(
    name: str, text: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_text(text)
    results = tmp_path / "results"
    argv = ["run", *TINY_RUN, "--config", str(path), "--results", str(results)]
    assert_clear_error(argv, capsys, fragment.format(path=path))
    assert not results.exists()


def test_a_tuning_range_to_infinity_is_refused_before_the_study_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tune", *TINY_RUN, "--trials", "1", "--space", "lr=1e-3:inf", "--results", str(tmp_path)]
    assert_clear_error(argv, capsys, "--space lr=1e-3:inf: lr is searched on a log scale; give finite values > 0")
    assert not list(tmp_path.iterdir())  # neither an Optuna study nor an MLflow run


def test_a_worker_on_a_mistyped_sqlite_path_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "typo" / "optuna.db"
    assert_clear_error(["worker", "--storage", f"sqlite:///{storage}"], capsys, f"no Optuna storage at {storage}")
    assert not storage.parent.exists()


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
        (["--batch-size", "0"], "--batch-size 0: every backbone normalises with BatchNorm"),
        (["--batch-size", "1"], "--batch-size 1: every backbone normalises with BatchNorm"),
        (["--steps", "0"], "--steps must be >= 1"),
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
