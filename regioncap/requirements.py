"""Optional packages a config needs, checked before any work starts.

``check_requirements(cfg)`` looks every module the chosen engine, logger and
executor import up with ``importlib.util.find_spec`` (nothing heavy is imported)
and raises :class:`~regioncap.errors.RunError` with one line naming the extra
to install (``pip install "regioncap[transformers]"``).
"""

from __future__ import annotations

from typing import Any, List

from regioncap.errors import RunError

#: (config group, option) -> (modules it imports, extra that installs them).
OPTIONAL = {
    ("logger", "wandb"): (("wandb",), "wandb"),
    ("executor", "ray"): (("ray",), "ray"),
}


def missing_requirements(cfg: Any) -> List[str]:
    """One line per unmet requirement of ``cfg`` (empty when everything is installed)."""
    from regioncap.engines import EngineError, check_requirements as check_engine, install_hint, missing_modules

    problems = []
    if "caption" in list(cfg.stages):
        try:
            check_engine(cfg.engine)
        except EngineError as exc:
            problems.append(str(exc))
    for (group, option), (modules, extra) in OPTIONAL.items():
        node = cfg.get(group)
        if node is not None and node.get("name") == option:
            missing = missing_modules(modules)
            if missing:
                problems.append(f"{group}={option} needs {', '.join(missing)}, which "
                                f"{'is' if len(missing) == 1 else 'are'} not installed: {install_hint(extra)}")
    return problems


def check_requirements(cfg: Any) -> None:
    """Raise :class:`RunError` (one line per missing extra) when ``cfg`` needs a package that is not installed."""
    problems = missing_requirements(cfg)
    if problems:
        raise RunError("; ".join(problems))
