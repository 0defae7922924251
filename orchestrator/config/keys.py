"""Dotted keys of a job mapping (`optim.base_lr`): looking one up, listing them, setting some.

Plain dicts only (what a YAML job file reads into); `--set`, sweep spaces and trials use these.
"""

from __future__ import annotations

import copy
from typing import Any

MISSING = object()


def lookup(tree: Any, dotted: str) -> Any:
    """tree[a][b]... for the key 'a.b...', or MISSING."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return MISSING
        tree = tree[part]
    return tree


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        keys.append(dotted)
        if isinstance(v, dict):
            keys += leaf_keys(v, dotted + ".")
    return keys


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the job dict with each dotted key of `values` set, sections created as needed."""
    result = copy.deepcopy(raw)
    for dotted, value in values.items():
        node = result
        *sections, leaf = dotted.split(".")
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return result
