""""Did you mean" for the command line: one line per misspelt group, option or top-level key
(and per option whose Hydra plugin is not installed).

``regioncap promt=crop`` gets Hydra's own error; this adds, just before it,
``did you mean prompt=crop? ('promt' is no config group or top-level option)``. Only the
standard library: it runs before Hydra composes anything, for every command.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

#: Sweep functions whose arguments are option names (``prompt=choice(marked,crop)``).
_SWEEP_CALL = re.compile(r"^\s*(choice|shuffle)\((.*)\)\s*$")


def config_dirs(argv: Sequence[str], shipped: str) -> Optional[List[Path]]:
    """The folders Hydra composes from for ``argv``: the shipped one, ``--config-dir``/``-cd``
    and ``hydra.searchpath``'s ``file://`` entries. None when a search path entry is not a
    folder (``pkg://``): the options there cannot be listed, so nothing is suggested."""
    dirs = [Path(shipped)]
    args = list(argv)
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            dirs.append(Path(args[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.lstrip("+~").startswith("hydra.searchpath="):
            entries = [e.strip().strip("'\"") for e in arg.split("=", 1)[1].strip("[]").split(",") if e.strip()]
            for entry in entries:
                if not entry.startswith("file://"):
                    return None
                dirs.append(Path(entry[len("file://"):]))
    return dirs


def groups_and_options(dirs: Iterable[Path]) -> Dict[str, Set[str]]:
    """Each config group in ``dirs`` (``model``, ``hydra/launcher``) and its options (YAML file stems)."""
    found: Dict[str, Set[str]] = {}
    for root in dirs:
        if not root.is_dir():
            continue
        for folder, _, files in os.walk(root):
            rel = Path(folder).relative_to(root).as_posix()
            if rel == ".":
                continue
            found.setdefault(rel, set()).update(f[:-5] for f in files if f.endswith(".yaml"))
    return found


def top_level_keys(schema: type) -> Set[str]:
    """The keys of the composed config's top level (the schema dataclass's fields)."""
    return {f.name for f in fields(schema)} if is_dataclass(schema) else set()


def _values(value: str) -> List[str]:
    match = _SWEEP_CALL.match(value)
    if match:
        value = match.group(2)
    elif "(" in value or "[" in value or "{" in value or "$" in value:
        return []  # range(), intervals, lists, interpolations: not option names
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def _close(word: str, candidates: Iterable[str]) -> Optional[str]:
    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestions(overrides: Sequence[str], groups: Dict[str, Set[str]], keys: Set[str]) -> List[str]:
    """One line for each override of ``overrides`` that names no group, option or top-level key
    and is close to one; nothing for overrides that are right or not close to anything."""
    lines = []
    known = set(keys) | {g for g in groups if "/" not in g}
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, value = override.split("=", 1)
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        key = key[len(prefix):]
        head = re.split(r"[.@]", key, maxsplit=1)[0]
        if head == "hydra" or not head or head.startswith("hydra/"):
            continue
        if key in groups:
            if prefix == "~":
                continue
            options = groups[key]
            values = _values(value)
            wrong = [v for v in values if v not in options and v != "null"]
            fixed = [v if v not in wrong else (_close(v, options) or v) for v in values]
            if wrong and fixed != values:
                for bad, good in zip(values, fixed):
                    value = re.sub(rf"(?<![\w-]){re.escape(bad)}(?![\w-])", good, value, count=1)
                lines.append(f"did you mean {prefix}{key}={value}? ({key} has no option "
                             f"{', '.join(repr(v) for v in wrong)}; its options: {', '.join(sorted(options))})")
            continue
        if head in known or "/" in head:
            continue
        near = _close(head, known)
        if near:
            fixed = near + key[len(head):]
            if "." not in key and near in groups:
                # a group: suggest the option too when the value is close to one
                fixed_value = value
                for v in _values(value):
                    if v not in groups[near]:
                        good = _close(v, groups[near]) or v
                        fixed_value = re.sub(rf"(?<![\w-]){re.escape(v)}(?![\w-])", good, fixed_value, count=1)
            else:
                fixed_value = value
            lines.append(f"did you mean {prefix}{fixed}={fixed_value}? ('{head}' is no config group or "
                         f"top-level option)")
    return lines


def null_groups(overrides: Sequence[str], groups: Dict[str, Set[str]]) -> List[str]:
    """One line for each override that sets a config group to null (``engine=null``): Hydra stops on it
    with a traceback ("Config group override must be a string"); the line names the group's options."""
    lines = []
    for override in overrides:
        if override.startswith(("-", "~")) or "=" not in override:
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+")
        if key in groups and "null" in _values(value):
            lines.append(f"{key}=null: {key} is a config group; pick one of its options: "
                         f"{', '.join(sorted(groups[key]))}")
    return lines


#: Options that need a Hydra plugin: (group, option) -> (the plugin's module, its distribution, the extra).
PLUGINS = {
    ("hparams_search", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "optuna"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "optuna"),
}


def missing_plugins(overrides: Sequence[str]) -> List[str]:
    """One line for each override that picks an option whose Hydra plugin is not installed
    (Hydra itself would say only that the option cannot be found)."""
    import importlib.util

    lines = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        for v in _values(value):
            need = PLUGINS.get((key, v))
            if need is None:
                continue
            try:
                found = importlib.util.find_spec(need[0]) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                lines.append(f'{key}={v} needs {need[1]}, which is not installed: pip install "regioncap[{need[2]}]"')
    return lines


def print_suggestions(argv: Sequence[str], shipped: str, schema: type, file: Optional[object] = None) -> bool:
    """Print :func:`suggestions` for the command line ``argv`` to stderr; never raises. Returns False
    when ``argv`` cannot compose at all and the command should stop here (:func:`null_groups`, printed)."""
    import sys

    try:
        dirs = config_dirs(argv, shipped)
        if dirs is None:
            return True
        groups = groups_and_options(dirs)
        errors = null_groups(argv, groups)
        lines = errors or suggestions(argv, groups, top_level_keys(schema)) + missing_plugins(argv)
    except Exception:  # noqa: BLE001 - a courtesy; Hydra's own error still comes
        return True
    for line in lines:
        print(line, file=file or sys.stderr)
    return not errors
