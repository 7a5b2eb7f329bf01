"""``python -m bench profile``: one table of step costs, with ratios to EW and to the floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.profile import expand_methods

SMALL = ["--task-opt", "n_images=700", "--image-size", "16", "--batch-size", "4", "--steps", "1", "--warmup", "0"]


def test_profile_writes_phases_ratios_and_the_machine(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    code = main(["profile", "--methods", "mgda,libmtl:cagrad,deepchest", "--tasks", "4", *SMALL, "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["setup"]["n_tasks"] == 4 and report["machine"]["device"] == "cpu"
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["floor", "ew", "mgda", "libmtl:cagrad", "deepchest"]
    assert "hard-codes 3 tasks" in rows["libmtl:cagrad"]["refused"]
    for name in ("floor", "ew", "mgda", "deepchest"):
        ms = rows[name]["ms"]
        assert ms["step"] == pytest.approx(ms["forward"] + ms["gradients"] + ms["weighting"] + ms["optimizer"], rel=0.25)
        assert rows[name]["x_ew"] == pytest.approx(ms["step"] / rows["ew"]["ms"]["step"])
        assert rows[name]["x_floor"] == pytest.approx(ms["step"] / rows["floor"]["ms"]["step"])
        assert rows[name]["state_mb"] > 0 and rows[name]["peak_memory_mb"] == pytest.approx(
            rows[name]["state_mb"] + rows[name]["peak_memory_increase_mb"])
    assert rows["mgda"]["ms"]["weighting"] > 0 and rows["ew"]["x_ew"] == 1.0


def test_profile_feature_level_names_the_mode(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    assert main(["profile", "--methods", "pcgrad", "--grad-level", "features", "--tasks", "3", *SMALL, "--json", str(out)]) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["pcgrad"]["grad_level"] == "features" and rows["floor"]["grad_level"] == "parameters"


def test_profile_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--methods", "mgda,nonsense", *SMALL]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().out
    assert main(["profile", "--methods", "ew", "--tasks", "20", *SMALL]) == 2
    assert main(["profile", "--methods", "ew", "--amp", "--device", "cpu", *SMALL]) == 2


def test_expand_methods_puts_ew_first_and_expands_all() -> None:
    assert expand_methods("mgda") == ["ew", "mgda"]
    assert expand_methods("libmtl:all")[1:] == [f"libmtl:{n}" for n in ("cagrad", "ew", "gradnorm", "mgda", "pcgrad", "uw")]
    assert expand_methods("all,mgda,ew") == ["ew", "cagrad", "deepchest", "gradnorm", "mgda", "pcgrad", "uw", "uwo", "uwso"]
