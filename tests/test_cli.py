"""The deltahub command line, through typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from model_pairs import make_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("cli"))


def test_compress_info_verify_apply(pair, tmp_path):
    base, ft = pair
    out = tmp_path / "delta"
    r = runner.invoke(app, ["compress", str(base), str(ft), str(out), "--method", "svd", "--ratio", "1/4", "--rule", "*.mlp.*=dqrelo", "--max-shard-size", "30KB"])
    assert r.exit_code == 0, r.output
    assert "ratio" in r.output and "tensors" in r.output
    r = runner.invoke(app, ["info", str(out), "--json", "--tensors"])
    data = json.loads(r.output)
    assert data["method"]["name"] == "svd" and any(t["method"] == "dqrelo" for t in data["tensors"])
    r = runner.invoke(app, ["info", str(out), "--tensors"])
    assert r.exit_code == 0 and "compressed" in r.output
    r = runner.invoke(app, ["verify", str(out), "--check-base"])
    assert r.exit_code == 0 and r.output.startswith("OK")
    r = runner.invoke(app, ["verify", str(out), "--base", str(ft)])
    assert r.exit_code == 1 and "other weights" in r.output
    r = runner.invoke(app, ["apply", str(out), "-o", str(tmp_path / "full")])
    assert r.exit_code == 0 and (tmp_path / "full" / "model.safetensors").is_file()


def test_bad_input_gives_one_line_errors(pair, tmp_path):
    base, ft = pair
    r = runner.invoke(app, ["compress", str(base), str(ft), str(tmp_path / "d"), "--method", "nope"])
    assert r.exit_code == 1 and "unknown method 'nope'" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["compress", str(base), str(ft), str(tmp_path / "d"), "--method", "dqrelo", "--ratio", "1/16"])
    assert r.exit_code == 1 and "1/16" in r.output
    r = runner.invoke(app, ["compress", str(base), str(ft), str(tmp_path / "d"), "--ratio", "abc"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["compress", str(base), str(ft), str(tmp_path / "d"), "--ratio", "1/0"])
    assert r.exit_code == 2 and not isinstance(r.exception, ZeroDivisionError)  # a usage error
    r = runner.invoke(app, ["compress", str(base), str(ft), str(base), "--overwrite"])
    assert r.exit_code == 1 and "is the input" in r.output and (base / "model.safetensors").is_file()
    r = runner.invoke(app, ["info", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "Error" in r.output
    r = runner.invoke(app, ["--debug", "compress", str(base), str(ft), str(tmp_path / "d"), "--method", "nope"])
    assert r.exit_code != 0 and r.exception is not None


def test_help_has_examples():
    for cmd in ("compress", "apply", "info", "verify", "demo", "methods"):
        for flag in ("--help", "-h"):
            r = runner.invoke(app, [cmd, flag])
            assert r.exit_code == 0 and "Example" in r.output, (cmd, flag)


def test_real_subprocess(pair, tmp_path):
    base, ft = pair
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "delta"
    p = subprocess.run([sys.executable, "-m", "deltahub", "compress", str(base), str(ft), str(out), "-r", "1/2"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["deltahub", "info", str(out), "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["method"]["name"] == "auto"
    p = subprocess.run(["deltahub", "info", str(tmp_path / "missing")], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and p.stderr.strip().startswith("Error:") and len(p.stderr.strip().splitlines()) == 1


def test_methods_lists_each_methods_parameters():
    run = CliRunner().invoke(app, ["methods", "--params"])
    assert run.exit_code == 0
    auto = next(line for line in run.output.splitlines() if line.startswith("auto "))
    assert "lora=False" in auto and "max_rank=None" in auto
    doc = json.loads(CliRunner().invoke(app, ["methods", "--params", "--json"]).output)
    assert doc["params"]["svd"]["rank"] is None and "lora" in doc["params"]["auto"]
    assert CliRunner().invoke(app, ["methods"]).output.splitlines()[0] == "auto"  # plain: one name per line, as before
