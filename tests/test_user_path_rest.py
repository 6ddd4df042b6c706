"""Issue #16, the rest: the test Hub started on its own, the demo's pieces, the methods plot.

Real processes and real files: the Hub test double runs as ``python -m tests.hub_server`` in a
subprocess and the unchanged huggingface_hub client talks to it over HTTP from another one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _start_hub(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """Start ``python -m tests.hub_server`` and read its banner up to 'Ctrl-C'; (process, URL, banner lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.hub_server", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C"):
            break
    match = re.search(r"export HF_ENDPOINT=(http://127\.0\.0\.1:\d+)", "\n".join(lines))
    assert match, (lines, proc.stderr.read() if proc.poll() is not None else "")
    return proc, match.group(1), lines


CLIENT = """
import sys
from huggingface_hub import HfApi
api = HfApi()
print(api.whoami()["name"])
url = api.create_repo("{user}/hello-hub")
api.upload_file(path_or_fileobj=b"hello", path_in_repo="greeting.txt", repo_id="{user}/hello-hub")
print(url)
print(sorted(api.list_repo_files("{user}/hello-hub")))
"""


def _client(url: str, token: str, user: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run([sys.executable, "-c", CLIENT.format(user=user)], env=env, capture_output=True, text=True, timeout=120)


def test_hub_server_runs_on_its_own_until_ctrl_c(tmp_path):
    proc, url, banner = _start_hub("--port", "0")
    try:
        text = "\n".join(banner)
        assert "export HF_HUB_DISABLE_XET=1" in text and "export HF_TOKEN=" in text
        r = _client(url, "hf_anything", "user", tmp_path)
        assert r.returncode == 0, r.stderr
        name, repo_url, files = r.stdout.strip().splitlines()
        assert name == "user" and repo_url.startswith(url) and "greeting.txt" in files
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip().endswith("stopped") and "Traceback" not in err


def test_hub_server_port_token_and_storage_survive_a_restart(tmp_path):
    """--port is the port in the URL, --token is the only token accepted, --storage-dir keeps repos."""
    from hub_server import reserve_port

    port = reserve_port()
    store = tmp_path / "store"
    proc, url, _ = _start_hub("--port", str(port), "--storage-dir", str(store), "--token", "hf_secret", "--user", "alice")
    try:
        assert url == f"http://127.0.0.1:{port}"
        refused = _client(url, "hf_wrong", "alice", tmp_path)
        assert refused.returncode != 0 and "401" in refused.stderr
        r = _client(url, "hf_secret", "alice", tmp_path)
        assert r.returncode == 0, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0 and (store / "state.json").is_file()

    proc, url, _ = _start_hub("--storage-dir", str(store), "--token", "hf_secret", "--user", "alice")
    try:
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_secret", "HF_HOME": str(tmp_path / "hf-home")}
        code = "from huggingface_hub import HfApi; print(HfApi().list_repo_files('alice/hello-hub'))"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "greeting.txt" in r.stdout, r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_hub_server_reports_a_taken_port_in_one_line(tmp_path):
    proc, url, _ = _start_hub()
    try:
        port = url.rsplit(":", 1)[1]
        r = subprocess.run([sys.executable, "-m", "tests.hub_server", "--port", port], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
