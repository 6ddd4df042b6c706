"""Compress on a Ray cluster (deltahub/distributed.py), for real: a local Ray cluster of 2 CPUs
started here, whose workers use a Hugging Face cache of their own (as another machine would).
The repo written through Ray is the local run's, byte for byte; a task whose download fails is
retried; a job list with a bad job finishes the others; the CLI runs through a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import deltahub
from conftest import HUB_TOKEN

from model_pairs import make_pair

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    worker_home = tmp_path_factory.mktemp("ray-worker-hf-home")
    # address="local": a cluster of its own, even where another was started with `ray start`.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"HF_HOME": str(worker_home), "HF_TOKEN": HUB_TOKEN}})
    yield ray.get_runtime_context().gcs_address, worker_home
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("ray-pair"))


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "method, ratio, params",
    [("auto", 1 / 2, {}), ("auto", 1 / 2, {"lora": True}), ("dqrelo", 1 / 2, {}), ("dare", None, {"p": 0.5}), ("lossless", None, {})],
    ids=["auto", "auto-lora", "dqrelo-at-a-ratio", "dare-natural", "lossless"],
)
def test_ray_writes_the_local_runs_bytes(cluster, pair, tmp_path, method, ratio, params):
    """Planned tensors (auto) run all at once; dqrelo's whole-model ratio makes each tensor wait
    for the ones before it; both give the local bytes."""
    base, ft = pair
    local = deltahub.compress(base, ft, tmp_path / "local", method, ratio, params=params, progress=False)
    remote = deltahub.compress(base, ft, tmp_path / "ray", method, ratio, params=params, executor="ray", progress=False)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert remote.stored_bytes == local.stored_bytes and [t.rel_error for t in remote.tensors] == [t.rel_error for t in local.tensors]


def test_ray_with_calibration_writes_the_local_runs_bytes(cluster, tmp_path):
    """Calibration: the driver runs the base over the text once; each task gets its layer's H."""
    from deltahub.demo import DATA, build_pair

    base, ft = build_pair(tmp_path / "pair", base_steps=3, finetune_steps=3, progress=False)  # a Llama with a real tokenizer
    text = tmp_path / "cal.txt"
    text.write_text((DATA / "austen_excerpt.txt").read_text()[:4000])
    kw = dict(method="auto", ratio=1 / 8, calibration=text, calibration_tokens=256, progress=False)
    deltahub.compress(base, ft, tmp_path / "local", **kw)
    deltahub.compress(base, ft, tmp_path / "ray", executor="ray", **kw)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert json.loads((tmp_path / "ray" / "delta_config.json").read_text())["method"]["calibration"]["tokens"] > 0


def test_a_task_whose_download_fails_is_retried(cluster, pair, hub, tmp_path):
    """Base and fine-tune on the (local) Hub: the driver reads them in its cache, each worker
    downloads them into its own. The first download of a weight file a worker asks for is
    refused (HTTP 403): that task raises DownloadError, Ray runs it again, and the repo is the
    local run's."""
    from huggingface_hub import HfApi

    base, ft = pair
    api = HfApi(token=HUB_TOKEN)
    repos = {}
    for name, folder in (("base", base), ("ft", ft)):
        repos[name] = f"tester/ray-{name}-{uuid.uuid4().hex[:6]}"
        api.create_repo(repos[name])
        api.upload_folder(repo_id=repos[name], folder_path=str(folder))
    deltahub.compress(repos["base"], repos["ft"], tmp_path / "local", "auto", 1 / 2, token=HUB_TOKEN, progress=False)
    refused_before = sum(1 for m, path, status in hub.requests if status == 403)
    hub.fail_next("GET", r"/resolve/[0-9a-f]{40}/model\.safetensors$", status=403, times=1)
    deltahub.compress(repos["base"], repos["ft"], tmp_path / "ray", "auto", 1 / 2, token=HUB_TOKEN, executor="ray", progress=False)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert sum(1 for m, path, status in hub.requests if status == 403) == refused_before + 1  # the refusal happened, in a worker
    assert any((cluster[1] / "hub").glob(f"models--tester--ray-ft-*"))  # the workers' own cache


def test_ray_refuses_what_workers_cannot_read(pair, tmp_path):
    base, ft = pair
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="reads the checkpoints on the workers"):
        deltahub.compress(base, model.state_dict(), tmp_path / "d", executor="ray", progress=False)
    with pytest.raises(ValueError, match="executor must be 'local' or 'ray'"):
        deltahub.compress(base, ft, tmp_path / "d", executor="dask", progress=False)
    assert not (tmp_path / "d").exists()


def test_without_ray_nothing_imports_it(pair, tmp_path):
    code = ("import sys, deltahub; deltahub.compress(sys.argv[1], sys.argv[2], sys.argv[3], ratio=1/2, progress=False); "
            "print('ray' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, *map(str, pair), str(tmp_path / "d")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr[-2000:]


def test_compress_many_finishes_the_good_jobs_and_reports_the_bad_one(cluster, pair, tmp_path):
    base, ft = pair
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"- {{base: '{base}', finetuned: '{ft}', out: '{tmp_path / 'a'}', ratio: 1/2}}\n"
        f"- {{base: '{base}', finetuned: '{tmp_path / 'missing'}', out: '{tmp_path / 'b'}'}}\n"
        f"- {{base: '{base}', finetuned: '{ft}', out: '{tmp_path / 'c'}', method: dqrelo, ratio: natural, params: {{rank: 2}}}}\n"
    )
    outcomes = deltahub.compress_many(jobs, executor="ray", progress=False)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert "CheckpointError" in outcomes[1].error and str(tmp_path / "missing") in outcomes[1].error
    assert (tmp_path / "a" / "delta_config.json").exists() and (tmp_path / "c" / "delta_config.json").exists() and not (tmp_path / "b").exists()
    deltahub.compress(base, ft, tmp_path / "a-local", ratio=1 / 2, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "a-local")


@pytest.mark.parametrize(
    "text, message",
    [("[]", "non-empty list"), ('[{"base": "b", "finetuned": "f"}]', "'out' must be a non-empty string"),
     ('[{"base": "b", "finetuned": "f", "out": "o", "ratio": 2}]', "'ratio' must be a number in"),
     ('[{"base": "b", "finetuned": "f", "out": "o", "colour": 1}]', "unknown field"),
     ('[{"base": "b", "finetuned": "f", "out": "o"}, {"base": "b", "finetuned": "g", "out": "o"}]', "jobs 1 and 2 write o and o, the same folder")],
)
def test_bad_job_files_are_refused_before_any_work(tmp_path, text, message):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(text)
    with pytest.raises(deltahub.DeltahubError, match=message):
        deltahub.compress_many(jobs, progress=False)


def test_the_cli_through_a_subprocess(cluster, pair, tmp_path):
    """`deltahub compress --ray` joins the running cluster (RAY_ADDRESS) and writes the local bytes;
    `compress-many --json` prints one document and exits 1 when a job failed."""
    base, ft = pair
    # One torch thread, as this process (the bytes of a decomposition depend on the thread count).
    env = {**os.environ, "RAY_ADDRESS": cluster[0], "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "deltahub"]
    run = subprocess.run([*cli, "compress", str(base), str(ft), str(tmp_path / "ray"), "--ratio", "1/2", "--ray"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    deltahub.compress(base, ft, tmp_path / "local", ratio=1 / 2, progress=False)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"base": str(base), "finetuned": str(ft), "out": str(tmp_path / "m1"), "ratio": "1/2"},
                                {"base": str(base), "finetuned": str(tmp_path / "nope"), "out": str(tmp_path / "m2")}]))
    run = subprocess.run([*cli, "compress-many", str(jobs), "--ray", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["failed"] == 1 and [j["ok"] for j in doc["jobs"]] == [True, False]
    assert doc["jobs"][0]["base"] == str(base) and doc["jobs"][1]["finetuned"] == str(tmp_path / "nope")


def test_without_ray_installed_the_cli_names_the_extra(pair, tmp_path):
    """Ray made unimportable in the child (as on a machine without it): --ray is the user's error,
    exit 1, with the extra to install, and nothing is written."""
    code = "import sys; sys.modules['ray'] = None; sys.argv = ['deltahub'] + sys.argv[1:]; from cli.main import run; run()"
    run = subprocess.run([sys.executable, "-c", code, "compress", *map(str, pair), str(tmp_path / "d"), "--ratio", "1/2", "--ray"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 1 and "pip install 'deltahub[ray]'" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "d").exists()


def test_job_file_params_read_as_on_the_command_line(tmp_path):
    """A string value in a job file means what it means after -p on the command line."""
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- {base: b, finetuned: f, out: o, params: {noise_weight: '1/4', lora: 'true', max_rank: '8', sign_part: never}}\n")
    (job,) = deltahub.read_jobs(jobs)
    assert job.params == {"noise_weight": 0.25, "lora": True, "max_rank": 8, "sign_part": "never"}
    assert deltahub.get_method("auto", **job.params).noise_weight == 0.25


def test_a_job_may_not_write_where_another_reads(pair, tmp_path):
    base, ft = pair
    jobs = [{"base": str(base), "finetuned": str(ft), "out": str(tmp_path / "a")},
            {"base": str(base), "finetuned": str(ft), "out": str(ft / "sub")}]
    with pytest.raises(deltahub.JobFileError, match="job 2 writes .* where job 1 reads"):
        deltahub.compress_many(jobs, progress=False)
    assert not (tmp_path / "a").exists() and not (ft / "sub").exists()


def test_hostile_job_files_and_addresses_are_refused_with_one_line(pair, tmp_path):
    """From an attacker review: nested outputs, deep YAML, non-scalar params, NUL in paths, a FIFO
    as job file, an address nobody answers at: each a DeltahubError naming what to fix, fast."""
    import time

    base, ft = pair
    row = {"base": str(base), "finetuned": str(ft)}
    cases = [
        ([{**row, "out": str(tmp_path / "o")}, {**row, "out": str(tmp_path / "o" / "in")}], "one inside the other"),
        ([{**row, "out": str(tmp_path / "o"), "method": "dare", "params": {"p": [1, 2]}}], "params.p must be"),
        ([{**row, "out": str(tmp_path / "o\x00x")}], "NUL character"),
    ]
    for jobs, message in cases:
        with pytest.raises(deltahub.JobFileError, match=message):
            deltahub.compress_many(jobs, progress=False)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(deltahub.JobFileError, match="nested too deep"):
        deltahub.read_jobs(deep)
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"- {{base: {base}, finetuned: {ft}, out: {tmp_path / 'a'}, out: {tmp_path / 'b'}}}\n")
    with pytest.raises(deltahub.JobFileError, match="the key 'out' appears twice"):
        deltahub.read_jobs(twice)
    twice_json = tmp_path / "twice.json"
    twice_json.write_text(json.dumps([{"base": str(base), "finetuned": str(ft)}])[:-2] + f', "out": "a", "out": "b"}}]')
    with pytest.raises(deltahub.DeltahubError, match="the key 'out' appears twice"):
        deltahub.read_jobs(twice_json)
    fifo = tmp_path / "jobs.yaml"
    os.mkfifo(fifo)
    with pytest.raises(deltahub.JobFileError, match="not a regular file"):
        deltahub.read_jobs(fifo)
    t0 = time.monotonic()
    with pytest.raises(deltahub.DeltahubError, match="no Ray cluster answers at 127.0.0.1:1"):
        deltahub.compress(base, ft, tmp_path / "d", ratio=1 / 2, executor="ray", ray_address="127.0.0.1:1", progress=False)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "d").exists()


def test_a_fifo_as_weights_is_refused_not_waited_on(pair, tmp_path):
    base, ft = pair
    bad = tmp_path / "fifo-ft"
    bad.mkdir()
    (bad / "config.json").write_bytes((ft / "config.json").read_bytes())
    os.mkfifo(bad / "model.safetensors")
    with pytest.raises(deltahub.CheckpointError, match="model.safetensors is not a regular file"):
        deltahub.compress(base, bad, tmp_path / "d", ratio=1 / 2, progress=False)


# ------------------------------------------------------------------ lost workers, signals
def _busy_workers() -> list[int]:
    """Pids of Ray workers running one of our tasks now (Ray titles a busy worker ``ray::<function>``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith((b"ray::_encode_task", b"ray::_statistics_task")):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def larger_pair(tmp_path_factory):
    """A Llama-shaped pair whose largest tensors take about a second each to plan and encode (one
    thread), so that a run can be caught mid-task."""
    from benchmarks.generated import build

    return build(512, 2, cache=tmp_path_factory.mktemp("ray-larger-pair"))


def test_a_worker_killed_mid_task_does_not_lose_the_run(cluster, larger_pair, tmp_path):
    """The first worker seen running one of our tasks is killed (SIGKILL, as a lost node): Ray
    runs its task again on another worker and the repo is the local run's, byte for byte."""
    import signal
    import threading
    import time

    base, ft = larger_pair
    killed: list[int] = []
    done = threading.Event()

    def kill_one() -> None:
        while not done.is_set() and not killed:
            for pid in _busy_workers()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        deltahub.compress(base, ft, tmp_path / "ray", "auto", 1 / 16, executor="ray", progress=False)
    finally:
        done.set()
        killer.join()
    assert killed, "no task was caught running"
    deltahub.compress(base, ft, tmp_path / "local", "auto", 1 / 16, progress=False)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def _terminate_when_writing(cmd: list[str], env: dict, outs: list[Path]) -> subprocess.CompletedProcess:
    """Run ``cmd``; send SIGTERM once a partial folder of one of ``outs`` exists (the run is writing)."""
    import signal
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(next(out.parent.glob(f".{out.name}.partial-*"), None) for out in outs):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _raylets() -> int:
    """Ray clusters running on this machine (one raylet each)."""
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _title(p).split(b"\x00")[0].endswith(b"/raylet"))


def _title(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_sigterm_under_ray_removes_the_partial_output_and_the_cluster(larger_pair, tmp_path):
    """SIGTERM while `compress --ray` writes (Ray's own handler would abort the process, exit 134,
    leaving the partial folder and the cluster it started): exit 143, no output, no partial
    folder, and the local cluster it started is gone."""
    import time

    base, ft = larger_pair
    env = {**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
    raylets = _raylets()
    out = tmp_path / "d"
    # dqrelo at a whole-model ratio encodes each tensor after the one before: the write lasts the whole run.
    run = _terminate_when_writing([sys.executable, "-m", "deltahub", "compress", str(base), str(ft), str(out), "--method", "dqrelo", "--ratio", "1/8",
                                   "--ray"], env, [out])
    assert run.returncode == 143, run.stderr[-3000:]
    assert "terminated (SIGTERM); no unfinished output is left behind" in run.stderr
    assert list(tmp_path.iterdir()) == []
    for _ in range(100):  # the cluster's processes may take a moment to exit after the driver
        if _raylets() == raylets:
            break
        time.sleep(0.1)
    assert _raylets() == raylets


def test_sigterm_under_compress_many_stops_every_job(cluster, larger_pair, tmp_path):
    """Jobs run side by side in threads: SIGTERM stops all of them, each removing its partial folder."""
    base, ft = larger_pair
    outs = [tmp_path / "a", tmp_path / "b"]
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"base": str(base), "finetuned": str(ft), "out": str(o), "method": "dqrelo", "ratio": "1/8"} for o in outs]))
    env = {**os.environ, "RAY_ADDRESS": cluster[0], "OMP_NUM_THREADS": "1"}
    run = _terminate_when_writing([sys.executable, "-m", "deltahub", "compress-many", str(jobs), "--ray"], env, outs)
    assert run.returncode == 143, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.json"]


def test_device_cuda_on_a_cluster_without_gpus_is_refused(cluster, pair, tmp_path):
    """Ray would queue tasks that ask for a GPU forever on a CPU-only cluster."""
    base, ft = pair
    with pytest.raises(deltahub.DeltahubError, match="asks each Ray task for a GPU, and the cluster has none"):
        deltahub.compress(base, ft, tmp_path / "d", ratio=1 / 2, executor="ray", device="cuda", progress=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("method, ratio, params", [("auto", 1 / 2, {}), ("dqrelo", None, {"rank": 2}), ("dare", None, {"p": 0.5})])
def test_fused_experts_are_split_over_tasks_and_give_the_local_bytes(cluster, tmp_path, method, ratio, params):
    """A fused 3-D expert tensor (an MoE checkpoint's layout) is encoded by several tasks, a range
    of experts each, and put together by one more: the repo is the local run's, byte for byte."""
    from deltahub.distributed import expert_ranges

    base, ft = make_pair("qwen3_moe", tmp_path / "pair", fused=True)
    shapes = [tuple(deltahub.Checkpoint.open(ft).info(n).shape) for n in deltahub.Checkpoint.open(ft).names()]
    fused = [s for s in shapes if len(s) == 3]
    assert fused and all(len(expert_ranges(s, 2)) == s[0] for s in fused)  # 4 experts, 2 slots: one task per expert
    local = deltahub.compress(base, ft, tmp_path / "local", method, ratio, params=params, progress=False)
    remote = deltahub.compress(base, ft, tmp_path / "ray", method, ratio, params=params, executor="ray", progress=False)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert [t.rel_error for t in remote.tensors] == [t.rel_error for t in local.tensors]


def test_expert_ranges_cover_every_expert_once():
    from deltahub.distributed import expert_ranges

    for experts, slots in ((2, 1), (5, 2), (128, 4), (128, 64), (3, 100)):
        ranges = expert_ranges((experts, 8, 8), slots)
        assert ranges[0][0] == 0 and ranges[-1][1] == experts and all(a < b for a, b in ranges)
        assert all(r[1] == n[0] for r, n in zip(ranges, ranges[1:])) and len(ranges) == min(experts, 2 * slots)


# ------------------------------------------------------------------ from the second review
def test_more_driver_threads_than_any_node_has_cpus_does_not_queue_forever(cluster, pair, tmp_path):
    """A task asks for as many CPUs as torch threads: 3 on a 2-CPU cluster was queued forever.
    The thread count is capped at the largest node's CPUs, and the bytes are a local run's at 2."""
    base, ft = pair
    torch.set_num_threads(3)
    try:
        deltahub.compress(base, ft, tmp_path / "ray", "auto", 1 / 2, executor="ray", progress=False)
        torch.set_num_threads(2)
        deltahub.compress(base, ft, tmp_path / "local", "auto", 1 / 2, progress=False)
    finally:
        torch.set_num_threads(1)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


@pytest.mark.parametrize(
    "address, message",
    [("", "must be HOST:PORT, auto, local"), ("file:///etc/passwd", "only ray:// addresses take a scheme"), ("h:99999", "must be HOST:PORT"),
     ("x" * 5000 + ":1", "characters long"), ("[::1]:1", "no Ray cluster answers at \\[::1\\]:1")],
)
def test_hostile_ray_addresses_are_one_line_errors(pair, tmp_path, address, message):
    base, ft = pair
    with pytest.raises(deltahub.DeltahubError, match=message):
        deltahub.compress(base, ft, tmp_path / "d", ratio=1 / 2, executor="ray", ray_address=address, progress=False)
    assert not (tmp_path / "d").exists()


def test_jobs_are_checked_together_before_any_runs(pair, tmp_path):
    """A typo in the last job is found before the first runs; a job may not read what another
    will write, even before it exists."""
    base, ft = pair
    row = {"base": str(base), "finetuned": str(ft)}
    with pytest.raises(deltahub.JobFileError, match="job 2 .*unknown method"):
        deltahub.compress_many([{**row, "out": str(tmp_path / "a")}, {**row, "out": str(tmp_path / "b"), "method": "autoo"}], progress=False)
    with pytest.raises(deltahub.JobFileError, match="job 2 .*rnak"):
        deltahub.compress_many([{**row, "out": str(tmp_path / "a")}, {**row, "out": str(tmp_path / "b"), "method": "svd", "params": {"rnak": 2}}], progress=False)
    with pytest.raises(deltahub.JobFileError, match="job 2 .*rule .*must look like"):
        deltahub.compress_many([{**row, "out": str(tmp_path / "a")}, {**row, "out": str(tmp_path / "b"), "rules": ["*.mlp.*svd"]}], progress=False)
    with pytest.raises(deltahub.JobFileError, match="job 2 .*noise_weight"):
        deltahub.compress_many([{**row, "out": str(tmp_path / "a")}, {**row, "out": str(tmp_path / "b"), "rules": ["*.mlp.*=auto:noise_weight=3"]}], progress=False)
    with pytest.raises(deltahub.JobFileError, match="job 1 writes .* where job 2 reads"):
        deltahub.compress_many([{**row, "out": str(tmp_path / "a")}, {"base": str(base), "finetuned": str(tmp_path / "a"), "out": str(tmp_path / "b")}], progress=False)
    assert not (tmp_path / "a").exists()


def test_an_interrupted_compress_many_does_not_stop_later_runs(cluster, larger_pair, tmp_path):
    """Ctrl-C during compress_many(executor="ray") in a long-lived process (a notebook): the jobs
    stop, and a later Ray run of the same process goes on."""
    base, ft = larger_pair
    code = f"""
import os, signal, threading, time, sys
from pathlib import Path
# Python ignores Ctrl-C when started with SIGINT ignored (a background job of a shell script, as
# CI may run it): take it as an interactive session does.
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch, deltahub
torch.set_num_threads(1)
tmp = Path({str(tmp_path)!r})
done = threading.Event()
def interrupt_when_writing():
    while not list(tmp.glob(".a.partial-*")):
        time.sleep(0.02)
    while not done.is_set():  # Ctrl-C, again if the first lands where Python cannot raise it
        os.kill(os.getpid(), signal.SIGINT)
        done.wait(1.0)
threading.Thread(target=interrupt_when_writing, daemon=True).start()
try:
    outcomes = deltahub.compress_many([dict(base={str(base)!r}, finetuned={str(ft)!r}, out=str(tmp / "a"), method="dqrelo", ratio="1/8")], executor="ray")
    sys.exit(f"not interrupted: {{[o.to_dict() for o in outcomes]}}")
except KeyboardInterrupt:
    done.set()
assert not (tmp / "a").exists() and not list(tmp.glob(".a.*")), list(tmp.iterdir())
deltahub.compress({str(base)!r}, {str(ft)!r}, tmp / "b", "auto", 1 / 16, executor="ray", progress=False)
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": cluster[0]})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
