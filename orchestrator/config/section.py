"""The base of every job-spec section: unknown keys are errors; `named` checks a key against a catalog table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from orchestrator.config.errors import one_of


def named(field: str, names, what: str = "value"):
    """A validator of `field`: its value must be one of `names` (a catalog table)."""
    def check(cls, value: str) -> str:
        return one_of(value, list(names), what)

    return field_validator(field)(classmethod(check))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)
