"""Reading a job: the YAML file, `--set a.b=value` overrides (typed as YAML), validation into a `JobSpec`.

`load_spec(path, overrides)` returns a validated `JobSpec`, or raises `SpecError` whose `.problems`
holds one line per problem, each naming the key ("optim.base_lr: must be > 0"). Imports no torch or Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.config.checks import check_consistency, format_error
from orchestrator.config.errors import SpecError
from orchestrator.config.keys import with_values
from orchestrator.config.spec import JobSpec


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value typed as YAML). Raises SpecError on a malformed one."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise SpecError([f"--set {text}: expected KEY=VALUE with a dotted key, e.g. optim.base_lr=0.01"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError([f"--set {key}: value is not valid YAML ({exc.__class__.__name__})"]) from None
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `raw` with each `--set a.b=value` set."""
    return with_values(raw, dict(parse_override(text) for text in overrides))


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The job file's mapping, or SpecError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such job file"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{path}: YAML syntax error{where}: {problem}"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{path}: not a text file"]) from None
    if raw is None:
        raise SpecError([f"{path}: the job file is empty"])
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: the job file must be a mapping of sections (name, data, model, ...), got a {type(raw).__name__}"])
    return raw


def validate_spec(raw: dict[str, Any]) -> JobSpec:
    """A validated JobSpec from a plain dict, or SpecError listing every problem."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([format_error(e) for e in exc.errors()]) from None
    problems = check_consistency(spec)
    if problems:
        raise SpecError(problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Job file + `--set` overrides -> validated JobSpec (or SpecError)."""
    return validate_spec(apply_overrides(read_job_file(path), overrides or []))


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
