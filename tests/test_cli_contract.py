"""The CLI contract that scripts rely on, through the real ``deltahub`` command with its output
captured as pipes (cli/main.py's module docstring): plain, whole lines when piped; one JSON
document with ``--json`` on every command that reports something; ``pull`` prints the path
alone; ``--version``, ``-h``, ``--quiet``; only deltahub's own progress bars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

import deltahub
from conftest import HUB_TOKEN
from deltahub.demo import build_pair

LONG_NAME = ("model.layers.0.mlp." + "experts_projection_" * 10)[:113] + ".weight"  # 120 characters
THIRD_PARTY_BARS = ("Loading weights", "Fetching", "Downloading", "Reconstructing")


def _env(**extra: str) -> dict:
    env = {**os.environ, "HF_TOKEN": HUB_TOKEN, **extra}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env.update(extra)
    return env


def cli(*args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``deltahub ARGS`` with stdout and stderr as pipes."""
    p = subprocess.run(["deltahub", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))
    if ok:
        assert p.returncode == 0, (args, p.returncode, p.stderr)
    return p


def as_json(p: subprocess.CompletedProcess) -> dict:
    """stdout is one JSON document and nothing else."""
    return json.loads(p.stdout)


def _long_name_pair(root: Path) -> tuple[Path, Path]:
    """Safetensors base and fine-tune with a 120-character tensor name (and the config of a model)."""
    g = torch.Generator().manual_seed(0)
    base = {LONG_NAME: torch.randn(32, 64, generator=g).bfloat16(), "lm_head.weight": torch.randn(16, 32, generator=g).bfloat16()}
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    for name, tensors in (("long-base", base), ("long-ft", ft)):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return root / "long-base", root / "long-ft"


@pytest.fixture(scope="module")
def world(hub, tmp_path_factory):
    """The small demo pair (a model with a tokenizer, so eval can run it) whose base is on the test Hub, its delta (local, and pushed as v1 of a
    Hub repo), and a delta with a 120-character tensor name."""
    root = tmp_path_factory.mktemp("cli-contract")
    base, ft = build_pair(root, base_steps=6, finetune_steps=6, progress=False)
    api = HfApi(token=HUB_TOKEN)
    base_repo = f"tester/base-{uuid.uuid4().hex[:8]}"
    api.create_repo(base_repo)
    api.upload_folder(repo_id=base_repo, folder_path=str(base))
    delta = root / "delta"
    deltahub.compress(base_repo, ft, delta, method="svd", ratio=1 / 2, token=HUB_TOKEN, progress=False)  # svd: seconds on busy cores
    repo = f"tester/delta-{uuid.uuid4().hex[:8]}"
    deltahub.push(delta, repo, message="first", token=HUB_TOKEN)
    long_base, long_ft = _long_name_pair(root)
    long_delta = root / "long-delta"
    deltahub.compress(long_base, long_ft, long_delta, method="dense", ratio=None, progress=False)
    return SimpleNamespace(root=root, base=base, ft=ft, base_repo=base_repo, delta=delta, repo=repo, long_ft=long_ft, long_delta=long_delta)


def test_version_and_help():
    p = cli("--version")
    assert p.stdout == f"deltahub {deltahub.__version__}\n" and p.stderr == ""
    top = cli("-h")
    assert "Usage: deltahub" in top.stdout and "Exit status" in top.stdout and "143" in top.stdout
    sub = cli("log", "-h")
    assert "Usage: deltahub log" in sub.stdout and "--json" in sub.stdout
    assert cli("info", "--no-such-option", ok=False).returncode == 2


def test_long_names_are_whole_when_piped(world):
    info = cli("info", str(world.long_delta), "--tensors")
    lines = info.stdout.splitlines()
    assert any(line.startswith(LONG_NAME + " ") for line in lines), info.stdout  # on one line, whole
    assert "…" not in info.stdout and "\x1b" not in info.stdout  # nothing cut, no colour
    header = next(line for line in lines if line.startswith("tensor "))
    assert header.split() == ["tensor", "kind", "method", "shape", "holds", "stored", "ratio"]
    ev = cli("eval", str(world.long_delta), "--finetuned", str(world.long_ft), "--tensors-only")
    assert any(line.startswith(LONG_NAME + " ") for line in ev.stdout.splitlines()), ev.stdout
    assert "…" not in ev.stdout
    tensors = as_json(cli("info", str(world.long_delta), "--tensors", "--json"))["tensors"]
    assert LONG_NAME in [t["name"] for t in tensors]
    worst = as_json(cli("eval", str(world.long_delta), "--finetuned", str(world.long_ft), "--tensors-only", "--json"))["worst"]
    assert worst[0]["name"] == LONG_NAME and worst[0]["rel_error"] >= 0


def test_pull_prints_exactly_the_path(world):
    p = cli("pull", world.repo, "--revision", "v1")
    path = p.stdout[:-1]
    assert p.stdout.endswith("\n") and "\n" not in path and len(path) > 80  # rich used to break it at 80 columns
    assert Path(path).is_dir() and (Path(path) / "delta_config.json").is_file()
    assert as_json(cli("pull", world.repo, "--revision", "v1", "--json")) == {"repo": world.repo, "revision": "v1", "path": path}


def test_log_piped_has_full_commits_dates_and_bases(world):
    logged = as_json(cli("log", world.repo, "--json"))
    assert {"repo", "branch", "versions", "history_bytes", "full_model_bytes", "summary"} <= set(logged)
    v = logged["versions"][0]
    head = HfApi(token=HUB_TOKEN).list_repo_commits(world.repo)[0].commit_id
    assert v["commit"] == head and v["tags"] == ["v1"] and v["base"].startswith(world.base_repo) and v["date"].startswith("20")
    assert len(v["base"].rsplit("@", 1)[1]) == 40  # the base's whole commit, as recorded
    p = cli("log", world.repo)
    row = next(line for line in p.stdout.splitlines() if line.startswith("v1 ")).split()
    assert row[1] == head and row[2] == v["date"] and row[-1] == v["base"], p.stdout  # whole: no cut commit, date or base


def test_json_on_every_command(world, tmp_path):
    out = tmp_path / "d"
    c = as_json(cli("compress", world.base_repo, str(world.ft), str(out), "-m", "svd", "-r", "1/2", "--json"))  # a Hub base: push takes it
    assert c["path"] == str(out) and c["stored_bytes"] > 0 and 0 < c["ratio"] <= 0.5
    assert {"tensors", "dense_bytes", "mean_rel_error", "max_rel_error", "fallbacks", "seconds"} <= set(c)
    assert {"name", "kind", "method", "shape", "rel_error"} <= set(c["tensors"][0])
    a = as_json(cli("apply", str(world.delta), "-o", str(tmp_path / "full"), "--json"))
    assert a["path"] == str(tmp_path / "full") and (tmp_path / "full" / "config.json").is_file()
    v = as_json(cli("verify", str(world.delta), "--json"))
    assert v["ok"] is True and v["checked_tensors"] > 0 and v["problems"] == []
    bad = cli("verify", str(out), "--base", str(world.ft), "--json", ok=False)
    assert bad.returncode == 1 and as_json(bad)["ok"] is False and as_json(bad)["problems"]
    i = as_json(cli("info", str(world.delta), "--json"))
    assert i["method"]["name"] == "svd" and i["base"]["name_or_path"] == world.base_repo
    pushed = as_json(cli("push", str(out), world.repo, "-m", "second", "--json"))
    assert pushed["repo_id"] == world.repo and pushed["tag"] == "v2" and len(pushed["commit"]) == 40 and pushed["files"] > 0
    assert {"url", "uploaded_bytes", "reused_bytes", "skipped", "note"} <= set(pushed)
    rb = as_json(cli("rollback", world.repo, "--to", "v1", "--json"))
    assert rb["tag"] == "v3" and rb["rolled_back_to"] == "v1" and len(rb["commit"]) == 40
    lora = as_json(cli("export-lora", str(world.delta), str(tmp_path / "lora"), "--json"))
    assert lora["path"] == str(tmp_path / "lora") and lora["modules"] and {"module", "rank", "rel_error"} <= set(lora["modules"][0])
    assert "auto" in as_json(cli("methods", "--json"))["methods"]


def test_eval_without_finetuned_and_only_deltahubs_bars(world):
    """eval of a Hub delta loads the base from the Hub and two models: no transformers or
    huggingface_hub bar, deltahub's own only; none with HF_HUB_DISABLE_PROGRESS_BARS=1; nothing
    at all on stderr with --quiet."""
    args = ("eval", world.repo, "--max-tokens", "64", "--json")
    p = cli(*args)
    report = as_json(p)
    assert report["text"]["nll_base"] > 0 and report["text"]["nll_delta"] > 0 and report["text"]["nll_finetuned"] is None
    assert report["text"]["retention"] is None and not report["tensors"]
    for bar in THIRD_PARTY_BARS:
        assert bar not in p.stderr, (bar, p.stderr)
    assert "NLL base" in p.stderr  # deltahub's own bar is drawn
    off = cli(*args, HF_HUB_DISABLE_PROGRESS_BARS="1")
    assert as_json(off)["text"] == report["text"]
    assert "NLL" not in off.stderr and "%|" not in off.stderr and "it/s" not in off.stderr, off.stderr
    quiet = cli("-q", *args)
    assert as_json(quiet)["text"] == report["text"] and quiet.stderr == ""
    plain = cli("-q", "eval", world.repo, "--max-tokens", "64")
    rows = [line.split("  ")[0] for line in plain.stdout.splitlines()]
    assert "not measured" in plain.stdout and "base + delta" in rows and "base" in rows and "fine-tune" not in rows, plain.stdout


def test_quiet_compress_prints_its_result_and_nothing_on_stderr(world, tmp_path):
    p = cli("--quiet", "compress", str(world.base), str(world.ft), str(tmp_path / "d"), "-m", "svd", "-r", "1/2")
    assert p.stderr == "" and p.stdout.startswith(str(tmp_path / "d")) and len(p.stdout.splitlines()) == 1


def test_json_of_every_result_type_is_strict_json(tmp_path):
    """NaN, infinities, paths, datetimes and nested dataclasses (the demo's rows) serialize as
    strict JSON (what jq and JavaScript accept)."""
    import datetime

    from cli.main import _jsonable
    from deltahub.demo import DemoResult, DemoRow

    result = DemoResult([DemoRow("bitdelta", float("nan"), float("inf"), 0.5, 1.0, "infeasible")], 2.0, 1.0, "text", tmp_path)
    data = json.loads(json.dumps(_jsonable({"demo": result, "when": datetime.datetime(2024, 1, 2, 3, 4, 5)}), allow_nan=False))
    assert data["demo"]["rows"][0] == {"method": "bitdelta", "ratio": None, "rel_error": None, "retention": 0.5, "compress_s": 1.0, "note": "infeasible"}
    assert data["demo"]["work_dir"] == str(tmp_path) and data["when"] == "2024-01-02T03:04:05"
