"""The README's two set-up commands stay the ones that CI runs and that exist as commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert "pytest" in commands[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines


def test_ci_runs_the_tests_in_a_random_order_it_prints_and_lists_the_skips():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(dep.startswith("pytest-randomly") for dep in project["project"]["optional-dependencies"]["test"])
    assert "-ra" in project["tool"]["pytest"]["ini_options"]["addopts"].split()   # the skips and their reasons
    ci = (ROOT / ".ci" / "run").read_text()
    assert "--randomly-seed=$seed" in ci and 'echo "tests in random order, seed $seed' in ci


def test_readme_main_job_uses_real_options():
    from click.testing import CliRunner

    from edgehebb.cli import cli

    main_job = readme_commands()[0].split("&& edgehebb ")[-1].split()
    help_text = CliRunner().invoke(cli, [main_job[0], "--help"]).output
    for option in (w for w in main_job if w.startswith("--")):
        assert option in help_text, option


def test_every_tool_answers_help():
    # tools/README.md: each script runs with --help (and prints JSON when run for real)
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    tools = sorted((ROOT / "tools").glob("*.py"))
    assert len(tools) >= 6

    def help_of(tool):   # each a fresh process importing torch: four at a time
        return subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        for tool, done in zip(tools, pool.map(help_of, tools)):
            assert done.returncode == 0 and "usage" in done.stdout.lower(), (tool.name, done.stderr[-500:])


def test_readme_python_examples_run_as_written(tmp_path):
    import subprocess
    import sys

    # the Runtime section's examples (the serving section's client needs a server: tests/test_triton.py runs one)
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
              if "from edgehebb import Runtime" in b]
    assert len(blocks) >= 2
    outputs = []
    for code in blocks:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (code, done.stderr[-1500:])
        outputs.append(done.stdout)
    assert "fastest installed CPU backend" in outputs[0] and list(tmp_path.iterdir()) == []
