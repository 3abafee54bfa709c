"""The run dir: every file name a run writes, its lock, its run key and what a resume finds there.

A run dir belongs to one run. :class:`RunDir` is the one place that knows the
names of the files in it, takes the lock that keeps a second process out, checks
and writes ``run_key.json`` (the settings that decide the answers) and scans a
stage's records file for the rows a killed or stopped run already committed.

Light on purpose (the standard library and the stages' declarations in
:mod:`regioncap.stages` only, at import time): the report, merge, export and
reproduce commands import the file names from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

from regioncap.components import plain
from regioncap.errors import RunError
from regioncap.record_types import ERROR, RECORD
from regioncap.stages import STAGES, CaptionStage, VisualizeStage

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig

log = logging.getLogger("regioncap")

#: The stages' records files are declared by the stage classes.
VISUALIZE_FILE = VisualizeStage.records_file
CAPTIONS_FILE = CaptionStage.records_file
METRICS_FILE = "metrics.json"
RUN_KEY_FILE = "run_key.json"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.html"
LOG_FILE = "regioncap.log"
LOCK_FILE = ".lock"
IMAGES_DIR = "images"
HYDRA_DIR = ".hydra"
#: Records files of the stages, in stage order (``stages=[...]`` names).
STAGE_FILES = {stage.name: stage.records_file for stage in STAGES}
#: A Hydra override value that needs no quotes (Hydra's grammar takes ASCII here only).
_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/.\-+@%]+")


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: quoted when it holds a space, a non-ASCII letter,
    parentheses or anything else Hydra's override grammar reads as syntax."""
    if _HYDRA_PLAIN.fullmatch(text):
        return text
    # Quoted: a quote is escaped, and so is every backslash just before a quote or the closing one.
    body = re.sub(r"(\\*)('|\Z)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return "'" + body + "'"


def shell_word(text: str) -> str:
    """``text`` as one shell word, in double quotes where that is enough (easier to read than shlex's)."""
    quoted = shlex.quote(text)
    if quoted == text or any(c in text for c in '"$`\\!'):
        return quoted
    return f'"{text}"'


def regioncap_command() -> str:
    """``regioncap`` as this process was started, to paste into a shell: the ``regioncap``
    command (by name where it is the one on PATH, else by its path), else the interpreter
    that runs this process with ``-m regioncap``, so a hint works without an activated venv."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and Path(argv0).name == "regioncap":
        on_path = shutil.which("regioncap")
        if on_path and Path(on_path).resolve() == Path(argv0).resolve():
            return "regioncap"
        return shell_word(str(Path(argv0).resolve()))
    return f"{shell_word(sys.executable or 'python')} -m regioncap"


def resume_args(path: Any) -> str:
    """``resume=true hydra.run.dir=PATH`` as typed in a shell, quoted for the shell and for Hydra where ``path``
    needs it (a run dir with spaces or accents cannot be pasted back otherwise)."""
    return "resume=true " + shell_word(f"hydra.run.dir={hydra_value(str(path))}")


#: What a run (or a merge) writes in its dir: no export or report may be written over it.
RUN_DIR_NAMES = (VISUALIZE_FILE, CAPTIONS_FILE, METRICS_FILE, RUN_KEY_FILE, MANIFEST_FILE, REPORT_FILE, LOG_FILE,
                 LOCK_FILE, IMAGES_DIR, HYDRA_DIR, "merge.json")
#: Any of these in a folder makes it a run dir (or a merged one).
_RUN_DIR_MARKS = (RUN_KEY_FILE, MANIFEST_FILE, VISUALIZE_FILE, CAPTIONS_FILE, "merge.json")


def holds_run(path: Path) -> bool:
    """True when the folder ``path`` holds a run's (or a merge's) files."""
    return any((Path(path) / m).is_file() for m in _RUN_DIR_MARKS)


def run_file_at(path: Path, *, allow: Tuple[str, ...] = ()) -> Optional[Path]:
    """The file or folder of a run dir that writing ``path`` would replace or write into, else None.

    ``python -m regioncap.export RUN --out RUN/captions.jsonl`` once replaced the
    records it exported with the export. Every tool that writes where a user
    says checks its target here: a name of :data:`RUN_DIR_NAMES` (but ``allow``)
    in a folder that holds a run's files, or anything below such a name
    (``images/``, ``.hydra/``), in this run or another.
    """
    target = Path(path).expanduser().resolve()
    below = target
    for folder in target.parents:
        name = below.relative_to(folder).parts[0]
        if name in RUN_DIR_NAMES and name not in allow and any((folder / m).is_file() for m in _RUN_DIR_MARKS):
            return folder / name
        below = folder
    return None


# ---------------------------------------------------------------- run key

#: Config sections whose every field decides the answers (their ``name`` aside).
_KEY_SECTIONS = ("prompt", "draw", "sampling")
_KEY_MODEL = ("path", "family", "revision", "min_pixels", "max_pixels", "patch_size", "merge_size", "dtype",
              "max_model_len")
#: Data fields that decide which rows are read and how; ``limit`` is left out
#: so a resume with a larger limit extends a run. ``source`` is the source's short name.
_KEY_DATA = ("path", "source", "hf_builder", "hf_config", "split", "hf_kwargs", "image_key", "bbox_key", "id_key",
             "bbox_format", "skip")
#: The values the ``hf`` settings of ``_KEY_DATA`` had in every source's section before each
#: source owned its settings: a section without them keys as it did then (a frozen record of
#: the key's shape, not a default anyone reads).
_KEY_DATA_BEFORE_SOURCES = {"hf_builder": None, "hf_config": None, "split": "train", "hf_kwargs": {}}
#: Fields in the key only when set other than their default, so the key (and a
#: resume) of a run that does not use them is as it was before they existed.
#: (A data source's own such fields are its class's ``key_fields``.)
_KEY_MODEL_OPTIONAL = {"weights": "real"}


def run_key_values(cfg: RegionCapConfig) -> Dict[str, Any]:
    """The settings that decide a run's answers: model, prompt, drawing, sampling, data, engine.

    Settings that change only how fast or how robustly answers come (batch
    sizes, retries, logging, ``engine.fail_keys``, ``data.limit``) are left out,
    so changing them does not block a resume.
    """
    from regioncap.data import resolve_path
    from regioncap.engines import engine_name

    from regioncap.families.base import family_class, family_name

    # A family's Config may lack a shared key (Florence has no pixel budget): it keys as null.
    model = {k: plain(getattr(cfg.model, k, None)) for k in _KEY_MODEL}
    # ``family``: the family's name (``qwen2_5_vl``), as in the key of a run made before ``model`` named its class.
    model["family"] = family_name(cfg.model)
    try:
        own = family_class(cfg.model).key_fields()
    except Exception:  # noqa: BLE001 - a class that does not import here keys by the shared fields
        own = ()
    for k in own:  # a family's own settings (InternVL's tiles); none for the Qwen families
        model[k] = plain(getattr(cfg.model, k))
    for k, default in _KEY_MODEL_OPTIONAL.items():
        if plain(getattr(cfg.model, k, default)) != default:
            model[k] = plain(getattr(cfg.model, k))
    values: Dict[str, Any] = {
        "model": model,
        "engine": {"name": engine_name(cfg.engine), "structured_outputs": getattr(cfg.engine, "structured_outputs", None)},
        "max_boxes": cfg.max_boxes,
        "seed": cfg.seed,
    }
    for section in _KEY_SECTIONS:
        values[section] = {k: v for k, v in plain(getattr(cfg, section)).items() if k != "name"}
    from regioncap.components import TARGET
    from regioncap.propose import NONE, proposer_name

    method = proposer_name(cfg.propose)
    if method != NONE:
        # ``method``: the proposer's short name, as in the key of a run made before options named classes.
        values["propose"] = {"method": method, **{k: v for k, v in plain(cfg.propose).items()
                                                  if k not in ("name", TARGET)}}
    from regioncap.data import source_class, source_name

    data = {k: plain(getattr(cfg.data, k, _KEY_DATA_BEFORE_SOURCES.get(k))) for k in _KEY_DATA}
    data["source"] = source_name(cfg.data)
    if data["path"] and not str(data["path"]).startswith("pkg://") and resolve_path(str(data["path"])).exists():
        data["path"] = str(resolve_path(str(data["path"])).resolve())
    if cfg.data.num_shards != 1:
        # Only when sharded, so the key (and a resume) of an unsharded run is as before.
        data["num_shards"], data["shard_index"] = cfg.data.num_shards, cfg.data.shard_index
    for k, default in source_class(cfg.data).key_defaults().items():
        if getattr(cfg.data, k, default) != default:
            data[k] = plain(getattr(cfg.data, k))
    values["data"] = data
    return values


def run_key_hash(values: Dict[str, Any]) -> str:
    """A short hash of :func:`run_key_values`."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """``["max_boxes: 10 -> 2", ...]``: what differs between two run keys."""
    changes = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += key_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changes.append(f"{prefix}{k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return changes


# ---------------------------------------------------------------- run dir


class RunDir:
    """The files of one run dir, its lock, its run key and the resume scan of its records files."""

    def __init__(self, path: Any) -> None:
        self.path = Path(path)
        self._lock_fh: Any = None
        #: :meth:`check_start` passed: this process holds the lock and wrote the run key.
        self.started = False

    # file names
    @property
    def visualize_file(self) -> Path:
        return self.path / VISUALIZE_FILE

    @property
    def captions_file(self) -> Path:
        return self.path / CAPTIONS_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def run_key_file(self) -> Path:
        return self.path / RUN_KEY_FILE

    @property
    def images_dir(self) -> Path:
        return self.path / IMAGES_DIR

    def records_file(self, stage: str) -> Path:
        """The records file of ``stage`` (``visualize`` or ``caption``)."""
        return self.path / STAGE_FILES[stage]

    def holds_results(self) -> List[str]:
        """Names of the records files here that hold at least one byte."""
        return [name for name in STAGE_FILES.values()
                if (self.path / name).exists() and (self.path / name).stat().st_size > 0]

    def __str__(self) -> str:
        return str(self.path)

    # lock
    def lock(self) -> None:
        """Hold ``DIR/.lock`` for the run: two processes appending to one records file would mix rows."""
        if self._lock_fh is not None:
            return
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / LOCK_FILE, "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise RunError(f"another regioncap process is writing {self.path} (it holds {self.path / LOCK_FILE}); "
                           f"wait for it to end, or use another hydra.run.dir") from None
        self._lock_fh = fh

    def unlock(self) -> None:
        """Let go of the lock (closing the file releases the flock)."""
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    # run key
    def check_start(self, cfg: RegionCapConfig) -> None:
        """Refuse to overwrite an earlier run's outputs, check a resume's settings, write ``run_key.json``.

        Without ``resume``, a stage whose records file already holds rows is
        refused (the visualize stage also refuses when captions exist: they
        would no longer match). With ``resume``, the settings that decide the
        answers must match the ones the run started with, unless ``resume_force``.
        Takes the lock first.
        """
        from regioncap.records import dumps, write_text_atomically

        self.lock()
        # A stage's records would no longer match the files of the stages after it: from the first
        # stage asked for on, every stage's file counts as written.
        first = next((i for i, stage in enumerate(STAGES) if stage.name in cfg.stages), len(STAGES))
        writes = [self.path / stage.records_file for stage in STAGES[first:]]
        existing = [p.name for p in writes if p.exists() and p.stat().st_size > 0]
        values = run_key_values(cfg)
        old = self.read_run_key()
        changes = key_changes(old["values"], values) if old else []
        if not cfg.resume:
            if cfg.retry_errors or cfg.resume_force:
                raise RunError("retry_errors=true and resume_force=true go with resume=true "
                               f"({regioncap_command()} {resume_args(self.path)} ...)")
            if existing:
                raise RunError(
                    f"{self.path} already holds {' and '.join(existing)} from an earlier run; regioncap does not "
                    f"overwrite them. To go on with that run: {resume_args(self.path)} (with its "
                    f"overrides); for a fresh run: a new hydra.run.dir")
            if changes:  # a caption-only run over an earlier visualize stage
                log.warning("%s was made with other settings; they changed: %s", self.visualize_file,
                            "; ".join(changes))
        elif changes:
            listed = "\n  ".join(changes)
            if not cfg.resume_force:
                raise RunError(
                    f"resume refused: {self.path} was started with other settings than these, and they decide "
                    f"the answers. Changed:\n  {listed}\nResume with the original overrides, or add "
                    f"resume_force=true to go on anyway (the rows already done keep their old answers), or start "
                    f"a new hydra.run.dir")
            log.warning("resume_force=true: resuming although these settings changed:\n  %s", listed)
        elif old is None and existing:
            log.warning("resume: %s has no %s; cannot check that the settings match", self.path, RUN_KEY_FILE)
        key: Dict[str, Any] = {"hash": run_key_hash(values), "values": values}
        if old and changes:
            key["previous"] = [*old.get("previous", []), {"hash": old.get("hash"), "values": old["values"]}]
        write_text_atomically(self.run_key_file, dumps(key) + "\n")
        self.started = True
        if cfg.resume:
            log.info("resume: run key %s%s", key["hash"], f" (was {old.get('hash')})" if changes else "")

    def read_run_key(self) -> Optional[Dict[str, Any]]:
        """``run_key.json`` as a dict, or None when there is none."""
        if not self.run_key_file.exists():
            return None
        try:
            return json.loads(self.run_key_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RunError(f"{self.run_key_file} is not JSON ({exc}); move it away to resume without the "
                           f"check") from None

    # resume
    def done_rows(self, stage: str, *, retry: bool = False) -> Tuple[Dict[int, "DoneRow"], Set[int]]:
        """``({index: DoneRow}, {indexes to redo})`` of a stage's records file, its torn tail cut off.

        ``retry``: rows whose error says it may pass another time (``error.retryable``:
        an engine or server failure, a timeout, a failed read) are to redo.
        """
        from regioncap.records import CorruptRecordsError, scan_records

        path = self.records_file(stage)
        if not path.exists():
            return {}, set()

        def pick(rec: Dict[str, Any]) -> Tuple[Any, Any, Any, bool]:
            err = rec.get(RECORD.error)
            err = err if isinstance(err, dict) else {}
            # ``error.retryable`` where the row says; a caption-stage error written before the field
            # was (every one was redone then) still counts as retryable.
            flag = err.get(ERROR.retryable)
            again = err.get(ERROR.stage) == CaptionStage.name if flag is None else bool(flag)
            return rec.get(RECORD.index), rec.get(RECORD.id), rec.get(RECORD.digest), again

        try:
            picks, cut = scan_records(path, pick)
        except CorruptRecordsError as exc:
            raise RunError(str(exc)) from None
        if cut:
            log.warning("resume: %s", cut)
        done: Dict[int, DoneRow] = {}
        redo: Set[int] = set()
        for n, (index, row_id, digest, again) in enumerate(picks, 1):
            if not isinstance(index, int) or isinstance(index, bool):
                raise RunError(f"{path}: record {n} has no integer 'index'; it was not written by regioncap's "
                               f"{stage} stage: start a new hydra.run.dir")
            if index in done:
                raise RunError(f"{path}: row index {index} ({row_id}) is there twice; every row must be there "
                               f"once: start a new hydra.run.dir")
            done[index] = DoneRow(row_id, digest)
            if retry and again:
                redo.add(index)
        log.info("resume: %s holds %d row(s)%s", path.name, len(done),
                 f"; {len(redo)} error row(s) will be redone" if retry else "")
        return done, redo

    def drop_rows(self, stage: str, indexes: Set[int]) -> int:
        """Rewrite a stage's records file without the rows ``indexes`` (atomically); return the rows kept."""
        from regioncap.records import read_jsonl, rewrite_atomically

        path = self.records_file(stage)
        return rewrite_atomically(path, (r for r in read_jsonl(path) if r.get(RECORD.index) not in indexes))


class DoneRow:
    """What a resume keeps of a committed row: its id and the digest of the input it came from."""

    __slots__ = ("row_id", "digest")

    def __init__(self, row_id: Any, digest: Any) -> None:
        self.row_id, self.digest = row_id, digest

    def check(self, path: Path, index: int, row_id: Any, digest: Any) -> None:
        """Raise :class:`RunError` when the input row at ``index`` is not the one committed there."""
        if self.row_id != row_id:
            raise RunError(f"resume: input row {index} has id {row_id!r} but {path} holds id {self.row_id!r} for it: "
                           f"the data changed since the run started (a row added, removed or edited); start a new "
                           f"hydra.run.dir")
        if self.digest and digest and self.digest != digest:
            # Same id (rows without ids are keyed by position): only the digest of the line tells them apart.
            raise RunError(f"resume: input row {index} (id {row_id!r}) has other content than the row {path} holds "
                           f"for it (digest {digest}, recorded {self.digest}): the data changed since the run "
                           f"started (a row added, removed or edited); start a new hydra.run.dir")
