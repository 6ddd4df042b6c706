"""Many fine-tunes served by vLLM (issue #18): the deltas as LoRA adapters on one engine, against
vLLM serving each merged fine-tune in turn, and against deltahub's own unmerged serving.

The fleet: the 16 training checkpoints of ``benchmarks.checkpoints`` (8 of the SFT run, 8 of the
RL-sized run, all fine-tunes of SmolLM2-135M-Instruct), each stored with ``auto`` at 1/16 with
``lora=True, max_rank=64`` (LoRA-exact), exported as a bf16 LoRA adapter (``export_lora``) and
applied (``deltahub apply``: the merged checkpoint). 4 deltas: the first 4 of them.

Per fleet size N (4, 16), each engine in a process of its own:

- **LoRA**: one ``vllm.LLM`` on the base with ``enable_lora, max_loras=N, max_lora_rank=64``;
- **merged in turn**: one ``vllm.LLM`` per merged checkpoint, one after another, each serving its
  own requests (the switch costs a start-up);
- **deltahub unmerged**: ``DeltaModel.from_base`` with the N deltas loaded, rows of a batch each
  with its own delta (``generate(..., delta_names=...)``), transformers' generate.

The workload at concurrency c: 16 requests, cycling over the N deltas, each a 64-token prompt of
Austen text and 32 greedy new tokens, served in waves of c requests at a time (``LLM.generate``
of c prompts; a merged engine takes the waves of its own requests). Reported: start-up, the
processes' resident memory after the run (vLLM: the engine's process tree, RSS summed; its KV
cache is fixed at ``VLLM_CPU_KVCACHE_SPACE``=1 GiB), the disk the fleet takes, and generated tokens
per second per concurrency level (first pass: adapters loaded on first use; the LoRA engine runs
the workload once before as warm-up of the adapter cache, reported separately).

    python -m benchmarks.checkpoints            # the 16 checkpoints (cached; main environment)
    .venv-vllm/bin/python -m benchmarks.vllm_serving --deltas 4 16     # tools/test_vllm.sh makes .venv-vllm

Results: ``benchmarks/results/vllm-serving.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("DELTAHUB_CACHE", Path.home() / ".cache" / "deltahub"))
RATIO = 1 / 16
MAX_RANK = 64
LEVELS = (1, 4, 16)
REQUESTS = 16
PROMPT_TOKENS = 64
NEW_TOKENS = 32
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}


def fleet_sources() -> tuple[Path, list[Path]]:
    """The base and the 16 checkpoints (8 SFT, 8 RL-sized), interleaved so the first 4 mix both runs."""
    runs = sorted((CACHE / "checkpoints").glob("ckpt-*-every3"))
    sft = sorted(next(r for r in runs if r.name.startswith("ckpt-sft")).glob("ckpt-*"), reverse=True)
    rl = sorted(next(r for r in runs if r.name.startswith("ckpt-rl")).glob("ckpt-*"), reverse=True)
    base = Path(json.loads((sft[0].parent / "run.json").read_text())["base"])
    return base, [p for pair in zip(sft, rl) for p in pair]


def prepare(fleet: Path) -> tuple[Path, list[dict]]:
    """Each checkpoint's LoRA-exact delta, its bf16 adapter and its merged checkpoint (cached)."""
    import deltahub

    base, sources = fleet_sources()
    members = []
    for i, src in enumerate(sources):
        name = f"ft{i:02d}-{src.parent.name.split('-')[1]}-{src.name}"
        delta, lora, merged = fleet / name / "delta", fleet / name / "lora", fleet / name / "merged"
        if not delta.exists():
            t0 = time.perf_counter()
            deltahub.compress(base, src, delta, method="auto", ratio=RATIO, params={"lora": True, "max_rank": MAX_RANK}, progress=False)
            print(f"[vllm_serving] {name}: compressed in {time.perf_counter() - t0:.1f} s", flush=True)
        if not lora.exists():
            report = deltahub.export_lora(delta, lora, dtype="bfloat16", progress=False)
            assert report.max_rank <= MAX_RANK and all(m.source == "factors" for m in report.modules), str(report)
        if not merged.exists():
            deltahub.apply(delta, merged, progress=False)
        members.append({"name": name, "delta": str(delta), "lora": str(lora), "merged": str(merged)})
    return base, members


def folder_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def prompts(base: Path) -> list[list[int]]:
    """REQUESTS prompts of PROMPT_TOKENS tokens each, from the Austen excerpt deltahub ships."""
    from transformers import AutoTokenizer

    text = (Path(__file__).parents[1] / "deltahub" / "data" / "austen_excerpt.txt").read_text()
    ids = AutoTokenizer.from_pretrained(base)(text).input_ids
    return [ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(REQUESTS)]


def tree_rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


# ------------------------------------------------------------------ one engine per process


def _llm(model: str, tokenizer: str | None = None, **kw):
    from vllm import LLM

    # The checkpoints are training checkpoints without tokenizer files: the base's tokenizer.
    return LLM(model=model, tokenizer=tokenizer or model, dtype="bfloat16", enforce_eager=True, max_model_len=512, max_num_seqs=max(LEVELS), seed=0, **kw)


def _waves(llm, jobs: list[tuple[list[int], object]], c: int) -> float:
    """Serve ``jobs`` (prompt ids, LoRA request) c at a time; wall seconds."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(0, len(jobs), c):
        wave = jobs[i:i + c]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in wave], params, lora_request=[r for _, r in wave], use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    return time.perf_counter() - t0


def worker_lora(base: Path, members: list[dict]) -> dict:
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    llm = _llm(str(base), enable_lora=True, max_loras=len(members), max_cpu_loras=len(members), max_lora_rank=MAX_RANK)
    startup = time.perf_counter() - t0
    loras = [LoRARequest(m["name"], i + 1, m["lora"]) for i, m in enumerate(members)]
    ids = prompts(base)
    jobs = [(ids[k], loras[k % len(loras)]) for k in range(REQUESTS)]
    cold = _waves(llm, jobs, max(LEVELS))  # first use of every adapter: loaded from disk
    seconds = {c: _waves(llm, jobs, c) for c in LEVELS}
    return {"startup_s": startup, "cold_s": cold, "seconds": seconds, "rss_mib": tree_rss_mib(os.getpid())}


def worker_merged(model: str, count: int, base: Path, offset: int) -> dict:
    t0 = time.perf_counter()
    llm = _llm(model, tokenizer=str(base))
    startup = time.perf_counter() - t0
    ids = prompts(base)
    jobs = [(ids[k], None) for k in range(offset, REQUESTS, count)]  # this fine-tune's share of the requests
    seconds = {c: _waves(llm, jobs, c) for c in LEVELS}
    return {"startup_s": startup, "seconds": seconds, "rss_mib": tree_rss_mib(os.getpid())}


def worker_deltahub(base: Path, members: list[dict]) -> dict:
    import torch
    import transformers

    from deltahub import DeltaModel

    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    m = DeltaModel.from_base(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16))
    for member in members:
        m.load_delta(member["delta"], member["name"])
    startup = time.perf_counter() - t0
    ids = prompts(base)
    names = [members[k % len(members)]["name"] for k in range(REQUESTS)]
    seconds = {}
    for c in LEVELS:
        t0 = time.perf_counter()
        for i in range(0, REQUESTS, c):
            batch = torch.tensor(ids[i:i + c])
            out = m.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, delta_names=names[i:i + c], pad_token_id=0)
            assert out.shape[1] == PROMPT_TOKENS + NEW_TOKENS
        seconds[c] = time.perf_counter() - t0
    return {"startup_s": startup, "seconds": seconds, "rss_mib": tree_rss_mib(os.getpid())}


def run_worker(*args: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vllm_serving", "--worker", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=Path(__file__).parents[1], timeout=3600)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    if run.returncode or not lines:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------ the report


def tok_s(seconds: float) -> str:
    return f"{REQUESTS * NEW_TOKENS / seconds:.1f}"


def run(sizes: list[int], fleet: Path, command: str) -> str:
    base, members = prepare(fleet)
    import vllm

    lines = ["# vLLM serving of many deltas (issue #18)", "", f"`{command}`", "",
             f"vLLM {vllm.__version__} on this machine's CPU ({os.cpu_count()} cores, bf16, eager, KV cache 1 GiB). Base {base.name}; "
             f"deltas: `auto` at 1/{round(1 / RATIO)} with lora=true, max_rank={MAX_RANK}; workload per concurrency level: {REQUESTS} requests "
             f"cycling over the deltas, {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} greedy new tokens; tokens/s = generated tokens / wall time.", ""]
    head = ["N", "serving", "start-up s", "memory MiB (RSS)", "disk MB"] + [f"tok/s c={c}" for c in LEVELS] + ["note"]
    rows = []
    for n in sizes:
        fleet_n = members[:n]
        lora = run_worker("lora", str(base), json.dumps(fleet_n))
        merged = [run_worker("merged", m["merged"], str(n), str(base), str(i)) for i, m in enumerate(fleet_n)]
        dh = run_worker("deltahub", str(base), json.dumps(fleet_n))
        base_mb = folder_bytes(base) / 1e6
        rows.append([n, "vLLM, deltas as LoRAs", f"{lora['startup_s']:.1f}", f"{lora['rss_mib']:.0f}",
                     f"{base_mb + sum(folder_bytes(m['lora']) for m in fleet_n) / 1e6:.0f}",
                     *[tok_s(lora["seconds"][str(c)]) for c in LEVELS], f"first pass (adapters loaded on first use): {tok_s(lora['cold_s'])} tok/s at c={max(LEVELS)}"])
        serve_s = {c: sum(m["seconds"][str(c)] for m in merged) for c in LEVELS}
        switch = sum(m["startup_s"] for m in merged)
        rows.append([n, "vLLM, merged fine-tunes in turn", f"{switch:.1f} (all {n})", f"{max(m['rss_mib'] for m in merged):.0f} (one at a time)",
                     f"{sum(folder_bytes(m['merged']) for m in fleet_n) / 1e6:.0f}",
                     *[tok_s(serve_s[c]) for c in LEVELS],
                     "with the starts: " + ", ".join(f"c={c} {tok_s(serve_s[c] + switch)}" for c in LEVELS)])
        rows.append([n, "deltahub unmerged (transformers)", f"{dh['startup_s']:.1f}", f"{dh['rss_mib']:.0f}",
                     f"{base_mb + sum(folder_bytes(m['delta']) for m in fleet_n) / 1e6:.0f}", *[tok_s(dh["seconds"][str(c)]) for c in LEVELS], "mixed-delta batches"])
        print(f"[vllm_serving] N={n} done", flush=True)
    from .measure import markdown_table

    lines += [markdown_table(head, rows), ""]
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm-serving.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltas", type=int, nargs="+", default=[4, 16], help="fleet sizes (at most 16)")
    parser.add_argument("--fleet", type=Path, default=CACHE / "bench" / "vllm-fleet", help="where the deltas, adapters and merged checkpoints are cached")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "lora":
            out = worker_lora(Path(rest[0]), json.loads(rest[1]))
        elif kind == "merged":
            out = worker_merged(rest[0], int(rest[1]), Path(rest[2]), int(rest[3]))
        else:
            out = worker_deltahub(Path(rest[0]), json.loads(rest[1]))
        print("RESULT " + json.dumps(out), flush=True)
        return
    if max(args.deltas) > 16 or min(args.deltas) < 1:
        parser.error("--deltas: between 1 and 16")
    print(run(args.deltas, args.fleet, "python -m benchmarks.vllm_serving " + shlex.join(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
