"""``print_config=true``: the composed config as a tree on the console (rich), when a job starts.

Takes the config as plain data (resolved, secrets masked: :func:`regioncap.job.config_dict`),
so it never sees a secret; ``rich`` is imported only when a tree is printed.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, TextIO

#: The groups a user picks, first and in this order; the top-level options follow in one branch.
GROUP_ORDER: Sequence[str] = ("model", "engine", "data", "draw", "prompt", "propose", "logger", "executor")


def config_tree(config: Dict[str, Any], choices: Optional[Dict[str, Any]] = None) -> Any:
    """A ``rich.tree.Tree`` of ``config``: one branch per group (its option's name beside it, from
    Hydra's ``choices``) holding the group's keys as YAML, then the other sections, then the
    top-level options."""
    import yaml
    from rich.syntax import Syntax
    from rich.tree import Tree

    choices = choices or {}
    tree = Tree("config", style="bold", guide_style="dim")
    sections = [k for k in GROUP_ORDER if isinstance(config.get(k), dict)]
    sections += [k for k, v in config.items() if isinstance(v, dict) and k not in sections]
    for key in sections:
        label = f"{key}={choices[key]}" if choices.get(key) else key
        branch = tree.add(f"[bold]{label}[/bold]")
        branch.add(Syntax(yaml.safe_dump(config[key], sort_keys=False).rstrip(), "yaml", theme="ansi_dark"))
    scalars = {k: v for k, v in config.items() if not isinstance(v, dict)}
    if scalars:
        tree.add("[bold]options[/bold]").add(
            Syntax(yaml.safe_dump(scalars, sort_keys=False).rstrip(), "yaml", theme="ansi_dark"))
    return tree


def print_config_tree(config: Dict[str, Any], choices: Optional[Dict[str, Any]] = None,
                      file: Optional[TextIO] = None) -> None:
    """Print :func:`config_tree` to ``file`` (default: stdout)."""
    from rich.console import Console

    Console(file=file, soft_wrap=True).print(config_tree(config, choices))
