"""The front door and the reference stay true: the README is short, the job-file tables are generated
from the spec, and every command the README's tour and docs/ show parses."""

import re
import shlex
import sys

import pytest

from conftest import REPO
from orchestrator.cli.app import build_parser

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) < 300


def test_the_job_file_tables_are_generated_from_the_spec():
    sys.path.insert(0, str(REPO / "tools"))
    from make_job_reference import generated

    assert generated() in (REPO / "docs" / "job-file.md").read_text()


def _shown_commands(path):
    """Every `orchestrator ...` command line in the file's ```bash blocks (after a `&&`, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            line = line.split("&& ")[-1]
            if line.startswith("orchestrator "):
                commands.append(line)
    return commands


SHOWN = [(path.name, command) for path in DOCS for command in _shown_commands(path)]


def test_the_tour_shows_every_command():
    from orchestrator.cli.commands import COMMANDS

    toured = {shlex.split(c)[1] for name, c in SHOWN if name == "README.md"}
    assert {command.name for command in COMMANDS} <= toured


@pytest.mark.parametrize("where, command", SHOWN, ids=[f"{n}:{c[:50]}" for n, c in SHOWN])
def test_every_shown_command_parses(where, command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    job = getattr(args, "job", None)
    if job and job.startswith("jobs/"):
        assert (REPO / job).is_file(), f"{where} shows {job}, which is not in the repository"
