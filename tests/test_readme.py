"""README's commands and Python example stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tasks
from bench.spec import RUN_DEFAULTS, load_config_file, resolve_spec

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command() -> None:
    commands = re.findall(r"^    (python3 -m venv .+)$", README, flags=re.MULTILINE)
    assert len(commands) >= 2
    demo, test = commands[0], commands[1]
    assert "-m bench run --methods all --task cxr14-synthetic" in demo
    assert test.endswith("-m pytest -q") and '".[test]"' in test
    assert README.index(demo) < README.index(test) < README.index("---")
    assert test in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_python_example_runs() -> None:
    (example,) = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    result = subprocess.run(
        [sys.executable, "-c", example], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "['cagrad', 'deepchest', 'ew', 'gradnorm', 'mgda', 'pcgrad', 'uw', 'uwo', 'uwso']" in result.stdout
    assert "libmtl:mgda" in result.stdout


def test_example_sweep_file_is_the_one_readme_names_and_a_valid_spec_of_every_option() -> None:
    path = REPO / "examples" / "sweep.yaml"
    assert "--config examples/sweep.yaml" in README
    config = load_config_file(path)
    assert set(config) == {*RUN_DEFAULTS, "task", "task_options", "hparams"}  # every option shown and explained
    spec = resolve_spec(config, {})
    assert spec.task == config["task"] and spec.methods == config["methods"] and spec.seeds == config["seeds"]
    assert spec.hparams == {"cagrad": {"calpha": 0.4}, "deepchest": {"init": "prevalence"}}
    tasks.create(spec.task, **spec.task_options)  # the suite accepts the task options
    rows = path.read_text().splitlines()
    for key in config:
        line = next(i for i, row in enumerate(rows) if row.startswith(f"{key}:"))
        assert "#" in rows[line] or rows[line - 1].startswith("#"), f"{key} is not explained by a comment"
