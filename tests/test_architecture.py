"""Architecture rules, checked on the source (unit tier: AST only, nothing is imported).

1. No import cycle among the modules of ``regioncap``, whatever the import
   statement's place: the module body, a ``try``/``if``, a function or a
   class. An import inside a function only delays the cycle to the first call
   (and hides it from the reader); the fix is to move the piece both modules
   need into a module of its own, or to pass it in.
2. No module of ``regioncap`` or ``scripts`` imports a private name (one
   starting with ``_``, dunders aside) from a regioncap module, anywhere in the
   file, and none reads a private attribute through a name it imported from a
   regioncap module (``tiny._corpus`` after ``from regioncap import tiny``).
3. Scripts use the public API: no ``obj._private`` attribute access on anything
   but ``self``/``cls`` (a heuristic: scripts should not reach into objects
   from other modules; a few standard-library names are allowed).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "regioncap"
SCRIPTS = REPO / "scripts"

#: Private attributes of the standard library that scripts may use.
STDLIB_PRIVATE = {("os", "_exit"), ("sys", "_getframe")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    """``{dotted name: file}`` of every module of the package."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def absolute(module: Optional[str], level: int, importer: str, is_package: bool) -> str:
    """The absolute module name of an ``import``/``from`` target (relative imports resolved)."""
    if not level:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def type_only(tree: ast.Module) -> Set[int]:
    """``id()`` of every statement under ``if TYPE_CHECKING:``: imports for annotations only, never run."""
    found: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            found |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return found


def imports(tree: ast.Module) -> Iterator[ast.stmt]:
    """Every import statement of a module that runs: in its body, in functions, in classes, anywhere
    but under ``if TYPE_CHECKING:`` (an annotation's import loads nothing)."""
    skip = type_only(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
            yield node


def targets(node: ast.stmt, importer: str, is_package: bool, modules: Dict[str, Path]) -> Set[str]:
    """The regioncap modules an import statement loads.

    Importing ``a.b.c`` loads ``a`` and ``a.b`` first; those packages are edges
    too, except the importer's own ancestors (the import system always loads a
    package before its modules, so that edge is no cycle unless the module
    names the package itself: ``from regioncap.propose import x``).
    """
    explicit: Set[str] = set()
    if isinstance(node, ast.Import):
        explicit = {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
        base = absolute(node.module, node.level, importer, is_package)
        subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
        explicit = subs if len(subs) == len(node.names) else subs | {base}
    ancestors = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    if is_package:
        ancestors.add(importer)
    found = set()
    for name in explicit:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in modules or prefix == importer:
                continue
            if prefix == name or prefix not in ancestors:
                found.add(prefix)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the regioncap modules its imports load (function-level ones included)."""
    modules = package_modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: Set[str] = set()
        for node in imports(tree):
            edges |= targets(node, name, is_package, modules)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path: List[str] = [start]
        its = [iter(sorted(graph[start]))]
        state[start] = 1
        while its:
            nxt = next(its[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                its.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                its.append(iter(sorted(graph.get(nxt, ()))))
    return None


def all_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per knot of ``graph``: for each set of modules that all reach each
    other (a strongly connected component of two or more), a cycle through it, so
    one test run names every knot to untie, not only the first."""
    remaining = {k: set(v) for k, v in graph.items()}
    found: List[List[str]] = []
    while True:
        cycle = find_cycle(remaining)
        if cycle is None:
            return found
        found.append(cycle)
        # Drop the whole knot: every module that both reaches and is reached by the cycle.
        knot = reachable(remaining, cycle[0]) & reachable(reversed_graph(remaining), cycle[0])
        remaining = {k: v - knot for k, v in remaining.items() if k not in knot}


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def reversed_graph(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    out: Dict[str, Set[str]] = {k: set() for k in graph}
    for k, vs in graph.items():
        for v in vs:
            out.setdefault(v, set()).add(k)
    return out


def source_files() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(SCRIPTS.glob("*.py"))


def private_imports(path: Path, root: Path = REPO) -> List[str]:
    """``from regioncap.x import _y`` anywhere in ``path``, and ``alias._y`` on names imported from regioncap
    (each as ``file:line: what``, the file relative to ``root``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    importer = module_name(path) if path.is_relative_to(PACKAGE) else ""
    where = path.relative_to(root)
    is_package = path.name == "__init__.py"
    found: List[str] = []
    imported: Set[str] = set()  # local names bound to regioncap modules or their objects
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level, importer, is_package)
            if base.split(".")[0] != "regioncap":
                continue
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"{where}:{node.lineno}: from {base} import {alias.name}")
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "regioncap":
                    if is_private(alias.name.split(".")[-1]):
                        found.append(f"{where}:{node.lineno}: import {alias.name}")
                    if alias.asname:
                        imported.add(alias.asname)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in imported:
                found.append(f"{where}:{node.lineno}: {base.id}.{node.attr}")
    return found


def script_private_attributes(path: Path, root: Path = REPO) -> List[str]:
    """``obj._private`` in a script, on anything but ``self``/``cls`` and a few standard-library names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or (base.id, node.attr) in STDLIB_PRIVATE):
                continue
            what = base.id if isinstance(base, ast.Name) else ast.unparse(base)
            found.append(f"{where}:{node.lineno}: {what}.{node.attr}")
    return found


# ---------------------------------------------------------------------- tests


def test_the_checker_sees_the_package():
    graph = import_graph()
    assert {"regioncap.run", "regioncap.rundir", "regioncap.stages.loop", "regioncap.executors.local"} <= set(graph)
    assert "regioncap.rundir" in graph["regioncap.run"]
    assert "regioncap.stages" in graph["regioncap.stages.loop"]  # the package runs before its module


def test_cycle_finder_finds_a_cycle_and_no_false_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_regioncap_modules():
    cycles = all_cycles(import_graph())
    assert cycles == [], ("import cycles (function-level imports count):\n" +
                          "\n".join(" -> ".join(c) for c in cycles) +
                          "\nmove the piece both modules need into a module of its own (or pass it in); "
                          "an import moved into a function only hides the cycle")


def test_all_cycles_names_each_knot_once():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}}
    assert all_cycles(graph) == [["a", "b", "a"], ["c", "d", "c"]]
    assert all_cycles({"a": {"b"}, "b": set()}) == []


def test_private_name_checks_catch_what_they_should(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from regioncap.tiny import _corpus\nfrom regioncap import tiny\ntiny._build_seeded()\n"
                   "import os\nos._exit(0)\nrun._workers()\nself._x\nx.__class__\n")
    assert private_imports(bad, tmp_path) == ["x.py:1: from regioncap.tiny import _corpus",
                                              "x.py:3: tiny._build_seeded"]
    assert sorted(script_private_attributes(bad, tmp_path)) == ["x.py:3: tiny._build_seeded", "x.py:6: run._workers"]


def test_no_private_names_imported_from_regioncap_modules():
    found = [f for path in source_files() for f in private_imports(path)]
    assert found == [], "private names used across modules (make them public):\n" + "\n".join(found)


def test_scripts_use_public_attributes_only():
    found = [f for path in sorted(SCRIPTS.glob("*.py")) for f in script_private_attributes(path)]
    assert found == [], "scripts reach into private attributes (add a public method):\n" + "\n".join(found)


def edges(source: str, importer: str = "regioncap.x") -> Set[str]:
    """The regioncap modules the imports of ``source`` load."""
    modules = package_modules()
    found: Set[str] = set()
    for node in imports(ast.parse(source)):
        found |= targets(node, importer, False, modules)
    return found


def test_imports_anywhere_are_edges():
    src = ("from regioncap.boxes import Box\n"
           "try:\n    from regioncap import draw\nexcept ImportError:\n    pass\n"
           "def f():\n    from regioncap.stages.loop import StageLoop\n"
           "class C:\n    def g(self):\n        import regioncap.records\n")
    assert edges(src) == {"regioncap.boxes", "regioncap.draw", "regioncap.stages", "regioncap.stages.loop",
                          "regioncap.records"}


def test_a_module_naming_its_own_package_is_an_edge_a_sibling_import_is_not():
    # plan.py importing a name from the package whose __init__ imports plan is a real cycle;
    # importing a sibling module loads the (already loading) package first, which is no cycle.
    assert edges("from regioncap.propose import select_proposals\n",
                              "regioncap.propose.plan") == {"regioncap.propose"}
    assert edges("from regioncap.propose.base import Proposal\n",
                              "regioncap.propose.plan") == {"regioncap.propose.base"}


#: Where the stages' names are declared (``VisualizeStage.name``, ``CaptionStage.name``); every other
#: module reads them from there.
STAGE_DECLARATIONS = PACKAGE / "stages" / "__init__.py"


def stage_name_literals(path: Path, names=("visualize", "caption")) -> List[str]:
    """``file:line`` of every use of a stage's name as a string literal: ``"visualize"`` anywhere (it
    names nothing else), ``"caption"`` where it is compared or looked up as a stage (``== "caption"``,
    ``"caption" in cfg.stages``, a default argument); ``caption`` as a region field stays allowed."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    label = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    where = lambda node: f"{label}:{node.lineno}"  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == names[0]:
            found.append(where(node))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Constant) and s.value in names[1:] for s in sides) and not any(
                    isinstance(op, (ast.In, ast.NotIn)) and isinstance(c, (ast.Tuple, ast.List, ast.Set))
                    for op, c in zip(node.ops, node.comparators)):
                found.append(where(node))
        elif isinstance(node, ast.arguments):
            defaults = node.defaults + [d for d in node.kw_defaults if d is not None]
            found += [where(d) for d in defaults if isinstance(d, ast.Constant) and d.value in names[1:]]
    return found


def test_stage_names_come_from_the_stage_classes():
    from regioncap import rundir
    from regioncap.stages import STAGE_NAMES, STAGES
    from regioncap.stages.caption import Captioner
    from regioncap.stages.visualize import Visualizer

    literals = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != STAGE_DECLARATIONS
                for hit in stage_name_literals(path)]
    assert literals == [], "read the stage's name from its class (regioncap.stages):\n" + "\n".join(literals)
    assert [Visualizer.name, Captioner.name] == list(STAGE_NAMES) == [s.name for s in STAGES]
    assert list(rundir.STAGE_FILES) == list(STAGE_NAMES)
    assert [Visualizer.records_file, Captioner.records_file] == list(rundir.STAGE_FILES.values())


def test_the_stage_name_check_sees_each_kind_of_use(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(stage="caption", reg={}):\n'
                   '    ok = reg.get("caption") or {"caption": 1} or key in ("bbox", "caption")\n'
                   '    return stage == "caption" or "caption" in stages or "visualize"\n')
    assert stage_name_literals(bad) == ["bad.py:1", "bad.py:3", "bad.py:3", "bad.py:3"]


def regioncap_imports(path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The regioncap modules ``path`` imports anywhere (short names: ``stages.loop``), packages it only
    passes through left out."""
    importer = module_name(path)
    found: Set[str] = set()
    for node in imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("regioncap"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("regioncap")}
    found.discard(importer)
    return {m[len("regioncap."):] for m in found if m != "regioncap"}


def test_the_module_table_of_design_md_names_what_each_module_imports():
    """docs/design.md, "Modules": each row's imports column names every regioncap module the module
    imports (in brackets when inside a function) and none it does not."""
    modules = package_modules()
    short = {m[len("regioncap."):] for m in modules if m != "regioncap"}
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    wrong = []
    for line in text.splitlines():
        row = re.match(r"\| `([\w/]+)\.py` \| .* \| (.*?) \| ?(?:yes)? ?\|$", line)
        if not row:
            continue
        name = row.group(1).replace("/__init__", "").replace("/", ".")
        path = PACKAGE / f"{row.group(1)}.py"
        if not path.is_file():
            wrong.append(f"{name}: no such module")
            continue
        named = set(re.findall(r"[a-z_][a-z_.]*[a-z_]", row.group(2))) & short
        actual = regioncap_imports(path, modules)
        if actual - named or named - actual:
            wrong.append(f"{name}: not named {sorted(actual - named)}; named, not imported {sorted(named - actual)}")
    assert wrong == [], "\n".join(wrong)


#: The modules that may import omegaconf or hydra: the job and what builds, checks and types its config
#: (the boundary: ``settings.typed_config``), and the tools that read a finished run's recorded config.
#: Everything the job calls below them (the run, stages, strategies, families, engines, executors,
#: proposers, data sources, loggers, trackers, prepare, manifest, rundir, requirements...) receives the
#: typed config (``regioncap.config.RegionCapConfig``) and reads plain attributes.
CONFIG_LAYER = {
    "regioncap.__main__", "regioncap.job", "regioncap.callbacks", "regioncap.api", "regioncap.config",
    "regioncap.components", "regioncap.settings", "regioncap.config_tree",
    # Tools over finished runs, not below a job: they read a run's recorded .hydra/config.yaml.
    "regioncap.export", "regioncap.merge",
}
#: Top-level packages whose import marks a module as reading the composed config.
CONFIG_PACKAGES = ("omegaconf", "hydra", "hydra_plugins")


def config_imports(path: Path) -> List[str]:
    """``line: import`` of every import of omegaconf or hydra in ``path``, at module level or in a function
    (``if TYPE_CHECKING:`` ones too: an annotation with DictConfig says the code reads one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] in CONFIG_PACKAGES for n in names):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_config_import_check_sees_every_kind(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom omegaconf import OmegaConf\ndef f():\n    import hydra.utils\n"
                   "    from hydra_plugins.x import y\nfrom regioncap import omegaconf_like\n")
    assert config_imports(bad) == ["2: from omegaconf import OmegaConf", "4: import hydra.utils",
                                   "5: from hydra_plugins.x import y"]


def test_below_the_job_nothing_imports_omegaconf_or_hydra():
    modules = package_modules()
    assert CONFIG_LAYER <= set(modules), sorted(CONFIG_LAYER - set(modules))
    found = [f"{path.relative_to(REPO)}:{hit}" for name, path in modules.items() if name not in CONFIG_LAYER
             for hit in config_imports(path)]
    assert found == [], ("below the job, code reads the typed config (regioncap.config.RegionCapConfig), "
                         "not a DictConfig; convert at the boundary (settings.typed_config):\n" + "\n".join(found))
