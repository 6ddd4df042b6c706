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

import pytest

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


def test_methods_plot_reads_the_peers_tables():
    """mergekit and zipnn come from the peers tables as written by benchmarks/peers.py."""
    from benchmarks.methods import peer_points

    md = (ROOT / "benchmarks" / "results" / "peers-smollm2-heavy.md").read_text()
    peers = peer_points(md)
    mergekit = sorted((p["ratio"], p["pr"], p["pr_unmerged"]) for p in peers if p["tool"] == "mergekit LoRA")
    zipnn = sorted((p["ratio"], p["pr"]) for p in peers if p["tool"] == "zipnn")
    assert mergekit == [(0.0607, 0.932, 0.9267), (0.1239, 0.9737, 0.9725)]
    assert zipnn == [(0.3983, 1.0), (0.6667, 1.0)]  # lossless: PR 1 by construction


def test_methods_plot_only_redraws_from_the_json(tmp_path):
    """``--plot-only`` measures nothing: from a results folder holding only the JSON and the peers
    table it writes the PNG and leaves the inputs as they were."""
    import shutil

    src = ROOT / "benchmarks" / "results"
    for name in ("methods-smollm2-heavy.json", "peers-smollm2-heavy.md"):
        shutil.copy(src / name, tmp_path / name)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = subprocess.run([sys.executable, "-m", "benchmarks.methods", "--model", "smollm2-heavy", "--plot-only", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "methods-smollm2-heavy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p != png} == before


def test_methods_plot_marks_points_off_the_scale():
    """A PR of -92 (deltadq at 1/32 on the heavy pair) is drawn on the top edge, labelled, not dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.methods import Y_TOP, _loss, _mark_clipped

    assert _loss(-92.4) == Y_TOP and _loss(0.99) == pytest.approx(0.01)
    fig, ax = plt.subplots()
    _mark_clipped(ax, [(0.0748, -92.4, "deltadq 1/32: PR -92.4", "C0"), (0.06, -1.5, "deltadq 1/16: PR -1.5", "C0")])
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["deltadq 1/16: PR -1.5", "deltadq 1/32: PR -92.4"]
    offsets = sorted(t.xyann[1] for t in ax.texts)
    assert offsets[0] != offsets[1]  # stacked, not written over each other
    plt.close(fig)


def _tiny_model_and_tokenizer():
    """The demo's tokenizer and an untrained small Llama (seeded): real model code, no training."""
    import torch
    import transformers

    from deltahub.demo import DATA, _tokenizer

    tok = _tokenizer([(DATA / "austen_finetune_excerpt.txt").read_text()[:20000]])
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), tok


def test_demo_continuation_probability_is_the_product_of_next_token_probabilities():
    import torch

    from deltahub.demo import CONTINUATION, PROMPT, REPETITION_PENALTY, continuation_probability, continue_greedily

    model, tok = _tiny_model_and_tokenizer()
    prompt_ids = tok(PROMPT).input_ids
    full = tok(PROMPT + CONTINUATION).input_ids
    assert full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids)  # the prompt's tokens are a prefix
    expected = 1.0
    with torch.no_grad():
        for k in range(len(prompt_ids), len(full)):  # one forward pass per token, the slow way
            probs = torch.softmax(model(input_ids=torch.tensor([full[:k]])).logits[0, -1].float(), dim=-1)
            expected *= float(probs[full[k]])
    assert continuation_probability(model, tok) == pytest.approx(expected, rel=1e-4)

    said = continue_greedily(model, tok, tokens=4)
    assert said == continue_greedily(model, tok, tokens=4)  # greedy: the same every time
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()
    seen = torch.tensor(sorted(set(prompt_ids)))
    logits[seen] = torch.where(logits[seen] > 0, logits[seen] / REPETITION_PENALTY, logits[seen] * REPETITION_PENALTY)
    first = int(logits.argmax())
    assert said.strip().startswith(tok.decode([first]).strip()) and "\n" not in said


def test_demo_explains_pr_its_range_and_the_natural_size_rows(tmp_path):
    """The footnotes a newcomer needs, computed from the result: PR, PR outside [0, 1] (which
    methods, here), natural-size rows; the comparison shows both models on the same prompt."""
    from deltahub.demo import DemoResult, DemoRow

    rows = [
        DemoRow("auto", 0.124, 0.2, 0.99, 1.0), DemoRow("dare", 0.125, 2.6, -6.2, 1.0), DemoRow("deltadq", 0.12, 3.4, -2.2, 1.0),
        DemoRow("bitdelta", 0.063, 0.6, 0.7, 1.0, "natural size"), DemoRow("lossless", 0.4, 0.0, 1.0, 1.0, "natural size"),
    ]
    r = DemoResult(rows, 3.60, 3.55, '"My dear Mr. Bennet,"', tmp_path, "auto", sample_base=" Dashwood was", sample_delta=" Bennet,\" said",
                   p_base=1e-6, p_delta=0.2)
    notes = "\n".join(r.notes())
    assert "share of the fine-tune's gain (0.050 nats/token here)" in notes
    assert "moves PR by 0.20" in notes and "PR above 1" in notes and "below 0" in notes
    assert "dare (-6.2), deltadq (-2.2)" in notes and "auto (" not in notes
    assert "natural size (bitdelta, lossless)" in notes and "no target ratio" in notes
    comparison = "\n".join(r.comparison())
    assert '  base:          "My dear Mr. Dashwood was' in comparison
    assert '  base + delta:  "My dear Mr. Bennet," said' in comparison and "base 1.0e-06, base + delta 2.0e-01 (200,000 times the base's)" in comparison
    text = str(r)
    assert text.index("dare") < text.index("PR (performance retention)") < text.index("base + delta:")


@pytest.mark.parametrize("pair", ["knowledge", "smollm2-heavy"])
def test_retention_report_redraws_from_the_json(tmp_path, pair):
    """``benchmarks.knowledge --plot-only`` writes the table and plot of the saved rows: facts and
    skill for the knowledge pair, PR alone for an Austen pair, every method variant a row."""
    import json
    import shutil

    name = "knowledge-retention" if pair == "knowledge" else f"retention-{pair}"
    shutil.copy(ROOT / "benchmarks" / "results" / f"{name}.json", tmp_path / f"{name}.json")
    r = subprocess.run([sys.executable, "-m", "benchmarks.knowledge", "--pair", pair, "--plot-only", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / f"{name}.md").read_text()
    rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    for method in {row["method"] for row in rows}:
        assert f"| {method} | " in md, method
    assert ("facts retention" in md) == (pair == "knowledge")
    png = tmp_path / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
