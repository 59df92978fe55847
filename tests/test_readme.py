"""The README's commands work as written: the quick start, CI's test command, and the torchrun lines."""
import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second_verbatim():
    commands = quick_start()
    assert len(commands) == 2
    assert commands[0].startswith("pip install -e . && flatcli train")
    assert commands[1] == 'pip install -e ".[test]" && python -m pytest'
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_quick_start_main_job_runs_and_ends_with_a_local_energy_table(tmp_path):
    job = quick_start()[0].split(" && ", 1)[1]  # the package is installed already
    result = subprocess.run(job, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "δε ± sem" in result.stderr and "checkpoint:" in result.stderr
    assert (tmp_path / "runs" / "quickstart" / "model.safetensors").is_file()


def scaling_lines_for_this_machine() -> list[str]:
    section = README.split("## Scaling out with torchrun", 1)[1].split("One machine with several GPUs", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    torchrun")]


def test_scaling_section_runs_as_written_with_two_processes(tmp_path):
    lines = scaling_lines_for_this_machine()
    assert lines and all("--nproc_per_node=2" in line for line in lines)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for line in lines:
        args = shlex.split(line)
        if "local-entropy" in args:  # as written, plus a smaller budget: the full one is a minute's work
            args += ["--steps", "20", "--burn-in", "5", "--max-examples", "256"]
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, (line, result.stderr[-2000:])
    for output in re.findall(r"--csv (\S+)", " ".join(lines)):
        assert (tmp_path / output).read_text().startswith("checkpoint,")


def test_every_relative_link_in_the_readme_and_the_report_resolves():
    for doc in (ROOT / "README.md", ROOT / "docs" / "reproduction" / "README.md"):
        links = re.findall(r"\]\(([^)#\s]+)\)", doc.read_text())
        local = [link for link in links if "://" not in link]
        assert local, doc
        missing = [link for link in local if not (doc.parent / link).exists()]
        assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_the_reproduction_section_regenerates_the_committed_report():
    section = README.split("## Reproducing the seed's claims", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    assert commands == ['pip install -e ".[plot]" && python examples/sweep.py && python examples/reproduce.py']
    report = (ROOT / "docs" / "reproduction" / "README.md").read_text()
    tuning = (ROOT / "docs" / "reproduction" / "tuning.md").read_text()
    assert "\n    python examples/reproduce.py\n" in report  # the report was made by the command the README shows
    assert "\n    python examples/sweep.py\n" in tuning


def test_the_plotting_pipe_runs_as_written(runs, tmp_path):
    """The README's local-energy | plot line, verbatim, on the tiny runs (sgd, and rsgd standing in for esgd)."""
    import pytest
    pytest.importorskip("matplotlib")
    line = next(line.strip() for line in README.splitlines() if "| flatcli plot -" in line)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sgd").symlink_to(runs / "sgd")
    (tmp_path / "runs" / "esgd").symlink_to(runs / "rsgd")
    result = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = re.search(r"-o (\S+)", line).group(1)
    assert (tmp_path / out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
