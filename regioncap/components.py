"""Components named by ``_target_``: how every config group names, types, checks and builds its class.

An option of a group (``conf/engine/vllm.yaml``) names its class by import path
(``_target_: regioncap.engines.vllm_engine.VllmEngine``), the way Hydra's
``instantiate`` does; the class owns what the option is:

- ``Config``: a dataclass of its settings (fields, defaults, docs); a value
  range is field metadata (``field(default=8, metadata=check(whole(1)))``),
  checked before anything is read;
- ``requires`` / ``extra``: the modules it imports when built, and the extra of
  the ``regioncap`` package that installs them (looked up, never imported);
- ``name``: its short name in run names, the log, the manifest and the report;
- capabilities: class attributes the run reads without building it.

Nothing keeps a list of the classes: a user's own class in their own package
works by naming it in their own ``--config-dir`` (docs/plugins.md).
:func:`register_schemas` stores each shipped option's ``Config`` in Hydra's
ConfigStore (found from the ``_target_`` lines of ``conf/<group>/*.yaml``), so a
shipped option is checked while Hydra composes and ``engine.batch_size=4`` needs
no ``+``; any option, shipped or not, is typed again at job start by
:func:`typed`, whose errors name the key (``engine.batch_size``).

Light on purpose: the standard library and OmegaConf only; a component's module
imports nothing heavy at module level (torch, vllm, ray, wandb are imported when
it is built), so resolving a class is cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

from regioncap.errors import RunError

__all__ = [
    "TARGET", "MISSING", "GROUPS", "OPTIONAL_GROUPS", "finite_number", "Component", "group_base", "type_groups", "schema_of", "Rule", "check", "whole", "real", "optional", "formats", "SEEDS", "resolve", "class_of", "short_name",
    "node_name", "typed", "range_problems", "missing_modules", "install_hint", "requirement_problem", "shipped_targets",
    "register_schemas", "plain", "setting",
]

#: The key of a group's node that names its class.
TARGET = "_target_"
#: The default of a ``Config`` field an option must set: OmegaConf's missing-value marker (the
#: literal it compares with), so a component's module declares it without importing OmegaConf.
MISSING = "???"

#: ``(test, what a value must be)``: a value range of a setting.
Rule = Tuple[Callable[[Any], bool], str]


# ------------------------------------------------------------------ value ranges


def finite_number(value: Any) -> bool:
    """A real number that is not a bool, NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(lo: int, hi: Optional[int] = None) -> Rule:
    """An integer in ``lo..hi``."""
    ok = (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi))
    return ok, f"a whole number >= {lo}" if hi is None else f"a whole number in {lo}..{hi}"


def real(lo: float, hi: Optional[float] = None, *, above: bool = False) -> Rule:
    """A finite number ``>= lo`` (``> lo`` with ``above``), at most ``hi``."""
    def ok(v: Any) -> bool:
        return finite_number(v) and (v > lo if above else v >= lo) and (hi is None or v <= hi)

    low = f"> {lo:g}" if above else f">= {lo:g}"
    return ok, f"a finite number {low}" + ("" if hi is None else f" and <= {hi:g}")


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""
    ok, what = rule
    return (lambda v: v is None or ok(v)), f"null or {what}"


def formats(example: Dict[str, Any]) -> Rule:
    """A ``str.format`` template whose placeholders are keys of ``example`` (by name, no index, attribute or
    positional field) and that formats with ``example``'s values: ``{n}`` and ``{{`` for a brace.

    ``example`` holds a value of each placeholder's type, so a format spec that cannot apply to it
    (``{labels:d}``) is refused too; a template that passes fills every row alike.
    """
    import string

    def ok(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        try:
            fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(v) if name is not None]
            if any(name not in example for name, _ in fields):  # '' (positional), 'n.real', 'n[0]', unknown
                return False
            if any(re.search(r"\d{5}", spec or "") for _, spec in fields):
                return False  # '{n:>10000000000}' would pad to 10 GB, here and in every label or prompt
            v.format(**example)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # '{n', '}', a bad spec
            return False
        return True

    known = ", ".join("{" + name + "}" for name in example)
    return ok, (f"a text whose placeholders are among {known} (a literal brace is written {{{{ or }}}})"
                if example else "a text without placeholders (a literal brace is written {{ or }})")


#: Seeds every RNG and engine takes: torch's generators and the OpenAI API's seed are signed 64-bit.
SEEDS: Rule = whole(0, 2**63 - 1)


def check(rule: Rule) -> Dict[str, Any]:
    """Field metadata that gives a setting its value range: ``field(default=8, metadata=check(whole(1)))``."""
    return {"check": rule}


def range_problems(node: Any, schema: Optional[type], key: str) -> List[str]:
    """One line per value of ``node`` outside the range its ``schema`` field declares (nested dataclasses too).

    ``key`` is the node's dotted key (``engine``; ``""`` for the root), so each
    line names the setting as a user types it: ``engine.batch_size must be a
    whole number >= 1, got 0``. Keys ``node`` lacks are not checked.
    """
    problems: List[str] = []
    if schema is None or not dataclasses.is_dataclass(schema) or node is None:
        return problems
    for f in dataclasses.fields(schema):
        if f.name not in node:
            continue
        where = f"{key}.{f.name}" if key else f.name
        rule = f.metadata.get("check")
        if rule is not None:  # only these values are read: another may interpolate what is not set yet
            ok, what = rule
            value = node[f.name]
            if not ok(value):
                problems.append(f"{where} must be {what}, got {value!r}")
        child = node._get_node(f.name) if hasattr(node, "_get_node") else None  # the node, unresolved
        nested = schema_of(child)
        if nested is not None:
            problems += range_problems(child, nested, where)
    return problems


def schema_of(node: Any) -> Optional[type]:
    """The dataclass that declares ``node``'s fields: the one it was typed with, else the ``Config``
    of the class its ``_target_`` names; None for a plain value, or a target that does not resolve
    (:func:`class_of` says why where it matters)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return None
    kind = OmegaConf.get_type(node)
    if kind is not None and dataclasses.is_dataclass(kind):
        return kind
    if TARGET in node:
        try:
            return getattr(resolve(node[TARGET], Component, TARGET), "Config", None)
        except RunError:
            return None
    return None


# ------------------------------------------------------------------ the class


class Component:
    """What a component class declares; the base class of each group (``Engine``, ``Executor``, ``RunLogger``) is one.

    Subclasses override the class attributes; ``Config`` of a subclass derives
    from its base's ``Config`` so the settings every member of the group has
    (an engine's ``batch_size``) are declared once.
    """

    @dataclasses.dataclass
    class Config:
        """Settings of the component; every ``Config`` derives from this one."""

        #: The class the node names (``package.module.Class``); a field so a composed node may hold it.
        _target_: Optional[str] = None

    #: Short name in run names, the log, the manifest, the report (``engine=transformers``);
    #: unset: the class name in lower case.
    name: ClassVar[str] = ""
    #: Modules the component imports when it is built, and the extra that installs them.
    requires: ClassVar[Tuple[str, ...]] = ()
    extra: ClassVar[Optional[str]] = None

    @classmethod
    def upgraded(cls, node: Any, key: str) -> Any:
        """A group's ``node`` written before its options named their class, as a node that names one
        (a base class of a group whose options once had another shape overrides this); else ``node``."""
        return node

    @classmethod
    def chosen(cls, node: Any) -> type:
        """The class that is built for ``node``: this one, or one it picks (``engine=auto``)."""
        return cls

    @classmethod
    def parts(cls, node: Any) -> List[Tuple[str, Any]]:
        """The components ``node`` holds (``logger=many``: the trackers it uses) as ``(key, node)``
        pairs, each checked for its packages like a group's node; none by default."""
        return []


def resolve(target: Any, base: type, key: str) -> type:
    """The class ``target`` (``"package.module.Class"``) names, checked to be a subclass of ``base``.

    ``key`` is the config key the target was read from (``engine._target_``);
    every error is a :class:`RunError` that names it and says what failed: no
    such module, no such attribute in it, or not a ``base``.
    """
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", target):
        raise RunError(f"{key} must name a class as package.module.Class, got {target!r}")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise RunError(f"{key}={target}: no module named {module_name!r} (is its package installed, "
                           "or on PYTHONPATH?)") from None
        raise RunError(f"{key}={target}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user's module can fail in any way; say where
        raise RunError(f"{key}={target}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise RunError(f"{key}={target}: module {module_name} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RunError(f"{key}={target}: {attr} is not a subclass of {base.__module__}.{base.__qualname__}")
    return cls


def class_of(node: Any, base: type, key: str) -> type:
    """The class a group's ``node`` names with ``_target_`` (see :func:`resolve`); ``key`` is the group (``engine``)."""
    target = setting(node, TARGET)
    if target is None:
        raise RunError(f"{key}.{TARGET} is not set: the option must name its class "
                       f"({key}.{TARGET}=package.module.Class, see docs/plugins.md)")
    return resolve(target, base, f"{key}.{TARGET}")


def short_name(cls: type) -> str:
    """The name a person knows the class by (``transformers``): its own ``name``, else its class name in lower case."""
    return vars(cls).get("name") or cls.__name__.lower()


def node_name(node: Any) -> Optional[str]:
    """The short name of the class a group's ``node`` (a config node or the plain dict a run
    recorded) names; a ``_target_`` that does not import here: its class name in lower case;
    no ``_target_`` (a run recorded before there was one): the node's ``name``."""
    if node is None or isinstance(node, (str, int, float, bool)):
        return None
    target = setting(node, TARGET)
    if not target:
        return setting(node, "name")
    try:
        return short_name(resolve(target, Component, TARGET))
    except RunError:
        return str(target).rpartition(".")[2].lower()


def typed(node: Any, cls: type, key: str) -> Any:
    """``node`` merged onto ``cls.Config``: a structured node whose values have their declared types.

    A key the ``Config`` does not have, or a value that is not of its type,
    raises :class:`RunError` naming ``<key>.<field>`` and the class. The result
    keeps the node's ``_target_`` (a field of every ``Config``).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    config = getattr(cls, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise RunError(f"{key}: {cls.__module__}.{cls.__qualname__} has no Config dataclass")
    try:
        values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        merged = OmegaConf.merge(OmegaConf.structured(config), values)
    except OmegaConfBaseException as exc:
        inner = str(getattr(exc, "full_key", None) or "")
        field_key = inner if inner.startswith(f"{key}.") else f"{key}.{inner}" if inner else key
        what = str(getattr(exc, "msg", exc)).splitlines()[0]
        if isinstance(exc, ConfigKeyError):
            what = f"not a setting of {cls.__module__}.{cls.__qualname__}"
        raise RunError(f"{field_key}: {what}") from None
    return merged


def setting(node: Any, key: str, default: Any = None) -> Any:
    """``node``'s ``key``, else ``default``: for code that reads a typed ``Config`` and a recorded
    config (a plain dict read back from a run's files) alike; typed code reads attributes."""
    if node is None:
        return default
    if isinstance(node, dict) or (hasattr(node, "get") and hasattr(node, "keys")):
        return node.get(key, default)
    return getattr(node, key, default)


def plain(value: Any) -> Any:
    """``value`` as plain data: a ``Config`` dataclass (the typed run config, any of its sections) as a
    dict in field order, an Enum as its name, a mapping as a dict, a list or tuple as a list.

    The one conversion below the job: what :func:`OmegaConf.to_container` (``enum_to_str``) gives for
    the same config, so a run key, a manifest or a config shipped to another process is the same
    whichever form the config had. Any mapping or sequence works (a config node too: reading it
    resolves it).
    """
    from enum import Enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        # Keys a user added with ``+key=...`` (free sections such as ``+notes.*``): OmegaConf.to_object
        # sets them as attributes after the fields, and the config as written keeps them, in that order.
        for name, extra in vars(value).items():
            if name not in out and not name.startswith("_"):
                out[name] = plain(extra)
        return out
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "items") and hasattr(value, "keys"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and hasattr(value, "__getitem__")
                                             and hasattr(value, "__len__")):
        return [plain(v) for v in value]
    return value


# ------------------------------------------------------------------ requirements


def missing_modules(modules: Sequence[str]) -> List[str]:
    """The top-level modules of ``modules`` that cannot be imported here (looked up, never imported)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-installed package
            found = False
        if not found:
            missing.append(module)
    return missing


def install_hint(extra: Optional[str]) -> str:
    """How to install an extra of the ``regioncap`` package (``pip install "regioncap[vllm]"``)."""
    return f'pip install "regioncap[{extra}]"' if extra else "install them"


def requirement_problem(cls: type, picked: str) -> Optional[str]:
    """One line naming what ``cls`` needs and is not installed, and the extra to install; None when all is there.

    ``picked`` is how the user chose it (``engine=vllm``).
    """
    missing = missing_modules(getattr(cls, "requires", ()))
    if not missing:
        return None
    return (f"{picked} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: {install_hint(getattr(cls, 'extra', None))}")


# ------------------------------------------------------------------ Hydra's ConfigStore

#: Config group -> the base class every class named in it must derive from (``"module.Class"``,
#: imported only when the group is typed). One line per group, not per option.
GROUPS: Dict[str, str] = {
    "model": "regioncap.families.base.Family",
    "engine": "regioncap.engines.base.Engine",
    "prompt": "regioncap.strategies.PromptStrategy",
    "logger": "regioncap.loggers.RunLogger",
    "executor": "regioncap.executors.Executor",
    "propose": "regioncap.propose.base.Proposer",
    "data": "regioncap.data.DataSource",
}

#: Groups whose option may name no class: ``propose=none`` (no ``_target_``) is "no proposer".
OPTIONAL_GROUPS = ("propose",)


def group_base(group: str) -> type:
    """The base class of ``group`` (see :data:`GROUPS`)."""
    return resolve(GROUPS[group], object, f"components.GROUPS[{group!r}]")


def type_groups(cfg: Any) -> None:
    """Replace each component group's node of ``cfg`` with the node typed by its class's ``Config`` (:func:`typed`).

    Raises :class:`RunError` naming the key for a ``_target_`` that does not
    resolve, names a class of another group, or a key or value its ``Config``
    refuses. A group ``cfg`` does not have is left alone.
    """
    from omegaconf import OmegaConf, open_dict, read_write

    for group in GROUPS:
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if node is None or (group in OPTIONAL_GROUPS and node.get(TARGET) is None):
            continue
        node = group_base(group).upgraded(node, group)
        cls = class_of(node, group_base(group), group)
        node = typed(node, cls, group)
        if OmegaConf.is_config(cfg):
            with read_write(cfg), open_dict(cfg):
                cfg[group] = node
        else:
            cfg[group] = node


#: A top-level ``_target_:`` line of an option file.
_TARGET_LINE = re.compile(rf"^{TARGET}:\s*([\w.]+)\s*$", re.MULTILINE)
#: Folders of the conf tree that are not component groups.
_NOT_GROUPS = ("hydra", "experiment")


def shipped_targets(conf_dir: Path) -> Iterator[Tuple[str, str, str]]:
    """``(group, option, target)`` of every option file in ``conf_dir/<group>/`` that names a class.

    Read with a regular expression, not a YAML parser: composing must stay cheap.
    """
    for group_dir in sorted(p for p in Path(conf_dir).iterdir() if p.is_dir() and p.name not in _NOT_GROUPS):
        for path in sorted(group_dir.glob("*.yaml")):
            match = _TARGET_LINE.search(path.read_text(encoding="utf-8"))
            if match:
                yield group_dir.name, path.stem, match.group(1)


def register_schemas(conf_dir: Path, store: Any) -> None:
    """Store the ``Config`` of every shipped option's class as ``schema/<group>/<option>`` in ``store``.

    The option file starts from it (``defaults: [/schema/engine/vllm@_here_, _self_]``),
    so Hydra checks its keys and types while composing and overrides of its
    settings need no ``+``. Derived from the files' ``_target_`` lines, so no
    list of options is kept by hand.
    """
    from omegaconf import OmegaConf

    for group, option, target in shipped_targets(conf_dir):
        cls = resolve(target, Component, f"{group}.{TARGET} (conf/{group}/{option}.yaml)")
        node = OmegaConf.structured(cls.Config)
        node[TARGET] = target
        store.store(group=f"schema/{group}", name=option, node=node)
