"""The real ``deltahub`` command never prints a traceback without ``--debug``: one ``Error:`` line
on stderr and a documented exit status (cli/main.py: 1 input error, 2 usage, 3 internal error,
130 Ctrl-C, 143 SIGTERM), and an interrupted write leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import deltahub
from conftest import write_delta
from model_pairs import make_pair

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def deltahub_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["deltahub", *args], capture_output=True, text=True, env=ENV)


def assert_one_error_line(p: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    """A valid delta and malformed copies of it: config not JSON, config a list, index a list."""
    root = tmp_path_factory.mktemp("cli-errors")
    enc = deltahub.encode_tensor("model.layers.0.w", torch.zeros(8, 8), torch.full((8, 8), 0.01), method="dense", ratio=None)
    good = write_delta(root / "good", [enc], {"base": {"name_or_path": str(root / "base")}})
    made = {"good": good}
    for name, file, text in (
        ("config-not-json", "delta_config.json", "{not json"),
        ("config-list", "delta_config.json", "[]"),
        ("index-list", "delta.safetensors.index.json", "[1, 2]"),
    ):
        shutil.copytree(good, root / name)
        (root / name / file).write_text(text)
        made[name] = root / name
    return made


def test_malformed_inputs_give_one_line_and_status_1(deltas, tmp_path):
    assert_one_error_line(deltahub_cli("info", str(tmp_path / "missing")), 1)
    assert_one_error_line(deltahub_cli("info", str(deltas["config-not-json"])), 1, "delta_config.json")
    assert_one_error_line(deltahub_cli("info", str(deltas["config-list"])), 1, "delta_config.json")
    assert_one_error_line(deltahub_cli("apply", str(deltas["index-list"]), "-o", str(tmp_path / "out")), 1, "index.json")
    assert not (tmp_path / "out").exists()
    # An error raised outside the command's main call: eval reads --text first.
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert_one_error_line(deltahub_cli("eval", str(deltas["good"]), "--finetuned", str(tmp_path), "--text", str(bad)), 1, "utf-8")


INTERNAL = textwrap.dedent(
    """
    import sys
    import cli.main as m

    def boom() -> None:
        m._run(len, 5)  # a bug inside a command's main call: a real TypeError

    def late() -> None:
        {}["missing"]  # a bug after it

    m.app.command("boom")(boom)
    m.app.command("late")(late)
    for argv in (["boom"], ["late"], ["--debug", "boom"]):
        sys.argv = ["deltahub", *argv]
        try:
            print("status", m.status(), flush=True)
        except TypeError as e:
            print("raised", type(e).__name__, flush=True)
        print("--", file=sys.stderr, flush=True)
    """
)


def test_internal_errors_give_one_line_and_status_3():
    p = subprocess.run([sys.executable, "-c", INTERNAL], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:3] == ["status 3", "status 3", "raised TypeError"], p.stdout
    boom, late, debug = p.stderr.split("--\n")[:3]
    for err, kind in ((boom, "TypeError"), (late, "KeyError")):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: internal error ({kind}: ") and "--debug" in lines[0], err
    assert debug.strip() == ""  # with --debug the exception goes on to the caller (and its traceback)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A pair with 300 matrices: compressing it takes seconds after the partial folder appears,
    so the signal lands mid-run (a tiny model's run could end before the signal is sent)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cli-signals")
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(256, 256, generator=g).bfloat16() for i in range(300)}
    ft = {n: (t.float() + 0.01 * torch.randn(256, 256, generator=g)).bfloat16() for n, t in base.items()}
    for name, tensors in (("base", base), ("ft", ft)):
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors")
    return root / "base", root / "ft"


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_compress_exits_cleanly_and_leaves_nothing(pair, tmp_path, sig, code, word):
    base, ft = pair
    out = tmp_path / "delta"
    # SIGINT back to its default in the child: a test run started in the background by a shell
    # (`cmd &`) ignores SIGINT, the child inherits that, and Python then installs no Ctrl-C handler.
    p = subprocess.Popen(
        ["deltahub", "compress", str(base), str(ft), str(out), "-m", "svd", "-r", "1/4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".delta.partial-*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == code, (p.returncode, stderr)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and word in errors[0] and stderr.rstrip().endswith(errors[0]), stderr
    assert list(tmp_path.iterdir()) == [], stderr  # no output, no partial folder


def test_info_on_a_missing_path_or_id_says_which(tmp_path, hub):
    """A path that does not exist is named as a path, not passed to the Hub's id validation; an id
    the Hub does not have is named as such; offline, the message says downloads are off."""
    env = {**os.environ, "COLUMNS": "1000"}
    for arg in ("./no-such-delta", str(tmp_path / "no-such-delta"), "a/b/c"):
        p = subprocess.run([sys.executable, "-m", "deltahub", "info", arg], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert p.returncode == 1 and p.stderr.startswith(f"Error: {arg} is not a folder"), p.stderr
    p = subprocess.run([sys.executable, "-m", "deltahub", "info", "tester/no-such-delta"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 1 and "no Hub repo of that name is visible" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = subprocess.run([sys.executable, "-m", "deltahub", "info", "tester/no-such-delta"], capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert p.returncode == 1 and "downloads are off" in p.stderr, p.stderr
