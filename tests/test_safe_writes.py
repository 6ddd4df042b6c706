"""Writers never delete or change an input, tidy what killed runs left, and give outputs the
user's usual permissions (issue #15, "Writes").

Everything here runs the real writers on real folders: real models, real links, real killed
processes, real umasks in subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import deltahub
from deltahub import DeltaWriter, OutputError
from deltahub.format.repo import atomic_dir, check_out_dir
from model_pairs import make_pair

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("safe"))


@pytest.fixture(scope="module")
def delta(pair, tmp_path_factory):
    base, ft = pair
    return deltahub.compress(base, ft, tmp_path_factory.mktemp("d") / "delta", method="svd", ratio=1 / 4, progress=False).path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links followed) with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ an output is never an input


def test_compress_refuses_to_overwrite_its_inputs(pair, tmp_path):
    base, ft = pair
    before = {base: snapshot(base), ft: snapshot(ft)}
    parent_of_base = tmp_path / "holder"
    inner = parent_of_base / "base"
    shutil.copytree(base, inner)
    cases = [
        (base, ft, base, "is the input"),  # out == base
        (base, ft, ft, "is the input"),  # out == fine-tune
        (inner, ft, parent_of_base, "contains the input"),  # out holds the base
        (base, ft, ft / "delta", "lies inside the input"),  # out inside the fine-tune
    ]
    for b, f, out, how in cases:
        with pytest.raises(OutputError, match=how) as e:
            deltahub.compress(b, f, out, method="svd", ratio=1 / 4, overwrite=True, progress=False)
        assert str(out) in str(e.value) and "choose an output folder" in str(e.value)
    assert snapshot(base) == before[base] and snapshot(ft) == before[ft]
    assert not (ft / "delta").exists() and (inner / "model.safetensors").is_file()
    assert sorted(p.name for p in base.parent.iterdir() if p.name.startswith(".")) == []


def test_compress_refuses_the_calibration_file_and_links_to_inputs(pair, tmp_path):
    base, ft = pair
    text = tmp_path / "cal.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    with pytest.raises(OutputError, match="is the input"):
        deltahub.compress(base, ft, text, calibration=text, overwrite=True, progress=False)
    assert text.read_text().startswith("It is a truth")
    link = tmp_path / "link-to-base"
    link.symlink_to(base, target_is_directory=True)
    with pytest.raises(OutputError, match="is the input"):  # real paths are compared
        deltahub.compress(base, ft, link, method="svd", ratio=1 / 4, overwrite=True, progress=False)
    assert link.is_symlink() and (base / "model.safetensors").is_file()


def test_apply_refuses_to_overwrite_the_delta_or_the_base(pair, delta, tmp_path):
    base, _ = pair
    before_delta, before_base = snapshot(delta), snapshot(base)
    with pytest.raises(OutputError, match="is the input"):
        deltahub.apply(delta, delta, overwrite=True, progress=False)
    with pytest.raises(OutputError, match="lies inside the input"):
        deltahub.apply(delta, delta / "full", overwrite=True, progress=False)
    with pytest.raises(OutputError, match="is the input"):  # the base given
        deltahub.apply(delta, base, base, overwrite=True, progress=False)
    with pytest.raises(OutputError, match="is the input"):  # the base the delta records, found only after opening it
        deltahub.apply(delta, base, overwrite=True, progress=False)
    assert snapshot(delta) == before_delta and snapshot(base) == before_base
    assert not (delta / "full").exists()


def test_export_lora_refuses_to_overwrite_the_delta_or_its_base(pair, delta):
    base, _ = pair
    before_delta, before_base = snapshot(delta), snapshot(base)
    with pytest.raises(OutputError, match="is the input"):
        deltahub.export_lora(delta, delta, overwrite=True, progress=False)
    with pytest.raises(OutputError, match="is the input"):  # the recorded base, not passed
        deltahub.export_lora(delta, base, overwrite=True, progress=False)
    assert snapshot(delta) == before_delta and snapshot(base) == before_base


def test_an_output_inside_a_hub_cache_repo_is_refused(pair, tmp_path):
    base, ft = pair
    repo = tmp_path / "hub" / "models--user--base"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(base, snap)
    for out in (snap / "delta", repo / "delta", repo):
        with pytest.raises(OutputError, match="Hugging Face cache"):
            deltahub.compress(snap, ft, out, method="svd", ratio=1 / 4, overwrite=True, progress=False)
    with pytest.raises(OutputError, match="contains the input"):  # the cache folder holding it
        deltahub.compress(snap, ft, tmp_path / "hub", method="svd", ratio=1 / 4, overwrite=True, progress=False)
    assert snapshot(snap) == snapshot(base)


def test_overwrite_of_an_unrelated_output_still_works(pair, delta, tmp_path):
    base, _ = pair
    out = tmp_path / "full"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an older model written there
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        deltahub.apply(delta, out, progress=False)
    deltahub.apply(delta, out, overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the old copy is gone too


def test_overwrite_never_replaces_a_folder_deltahub_could_not_have_written(pair, delta, tmp_path):
    """From a review: `--overwrite` (or a shared job file's `overwrite: true`) naming a home
    directory, a folder of photos or a Hugging Face cache would have deleted all of it."""
    base, ft = pair
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"jpeg")
    cache = tmp_path / "cache"
    (cache / "models--org--m" / "snapshots" / "abc").mkdir(parents=True)
    (cache / "config.json").write_text("{}")  # even beside a marker file
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, message in ((photos, "not a delta, adapter or model folder"), (cache, "holds a Hugging Face cache"), (a_file, "is a file")):
        with pytest.raises(OutputError, match=message):
            deltahub.compress(base, ft, out, method="svd", ratio=1 / 4, overwrite=True, progress=False)
        with pytest.raises(OutputError, match=message):
            deltahub.apply(delta, out, overwrite=True, progress=False)
    assert (photos / "a.jpg").read_bytes() == b"jpeg" and (cache / "models--org--m" / "snapshots" / "abc").is_dir() and a_file.read_text() == "mine"
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=1 / 4, progress=False)
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=1 / 3, overwrite=True, progress=False)  # a delta is replaced


def test_cli_overwrite_onto_the_base_is_refused_and_the_base_kept(pair, tmp_path):
    base, ft = pair
    before = snapshot(base)
    p = subprocess.run(["deltahub", "compress", str(base), str(ft), str(base), "--overwrite"], capture_output=True, text=True, env=ENV)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: the output") and "is the input" in lines[0], p.stderr
    assert snapshot(base) == before


# ------------------------------------------------------------------ leftovers of killed runs


def test_stale_partial_and_old_folders_are_removed_only_for_dead_writers(tmp_path):
    out = tmp_path / "delta"
    dead = dead_pid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".delta.partial-{dead}-abc12_xy": False,  # dead writer: removed
            f".delta.old-{dead}-0f1e2d3c": False,
            f".delta.partial-{os.getpid()}-abcd1234": True,  # live writers: kept
            f".delta.partial-{child.pid}-abcd1234": True,
            f".delta.partial-{dead}-ABCD1234": True,  # not the pattern exactly: kept
            f".delta.partial-{dead}": True,
            f".delta.partial-x{dead}-abcd1234": True,
            f".other.partial-{dead}-abcd1234": True,
            f"delta.partial-{dead}-abcd1234": True,
            f".delta.partial-0-abcd1234": True,  # pid 0 is never signalled
        }
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"x" * 10)
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / "keep.txt").write_text("keep")
        (tmp_path / f".delta.partial-{dead}-11111111").symlink_to(target, target_is_directory=True)
        out.mkdir()  # with ``out`` present a dead writer's old copy is not needed
        (out / "a.txt").write_text("current")
        (out / "config.json").write_text("{}")  # a model folder: overwrite may replace it
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
        for name, kept in names.items():
            assert (tmp_path / name).exists() == kept, name
        assert (tmp_path / f".delta.partial-{dead}-11111111").is_symlink() and (target / "keep.txt").read_text() == "keep"
        assert (out / "a.txt").read_text() == "new"
    finally:
        child.kill()
        child.wait()


def test_an_interrupted_overwrite_gets_its_old_output_back(tmp_path):
    # A writer killed between its two renames: the old output moved aside, the new one complete
    # in its partial folder, nothing at ``out``.
    out = tmp_path / "delta"
    dead = dead_pid()
    old = tmp_path / f".delta.old-{dead}-5a5a5a5a"
    old.mkdir()
    (old / "delta_config.json").write_text("old version")
    (tmp_path / f".delta.partial-{dead}-6b6b6b6b").mkdir()
    with pytest.raises(FileExistsError):  # restored, so no longer writable without overwrite
        check_out_dir(out, overwrite=False)
    assert (out / "delta_config.json").read_text() == "old version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "delta_config.json").write_text("new version")
    assert (out / "delta_config.json").read_text() == "new version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


def test_a_killed_compress_leaves_a_partial_that_the_next_run_removes(pair, tmp_path):
    base, ft = pair
    out = tmp_path / "delta"
    p = subprocess.Popen(["deltahub", "compress", str(base), str(ft), str(out), "-m", "svd", "-r", "1/4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    partials: list[Path] = []
    while not partials and p.poll() is None and time.monotonic() < deadline:
        partials = list(tmp_path.glob(".delta.partial-*"))
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert partials and p.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert partials[0].name.startswith(f".delta.partial-{p.pid}-") and partials[0].is_dir() and not out.exists()
    deltahub.compress(base, ft, out, method="svd", ratio=1 / 4, progress=False)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["delta"]
    assert deltahub.verify(out).ok


def test_a_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "delta"
    with pytest.raises(KeyboardInterrupt):
        with DeltaWriter(out) as w:
            w.add_file("a.txt", b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ permissions


PERMISSIONS = textwrap.dedent(
    """
    import os, sys, torch, deltahub
    from deltahub.format import make_record
    from deltahub.format.components import encode_dense
    delta, root = sys.argv[1], sys.argv[2]
    for mask in (0o022, 0o002):
        os.umask(mask)
        with deltahub.DeltaWriter(f"{root}/writer-{mask:o}") as w:
            record, tensors = make_record("dense", (2,), "F32", [encode_dense(torch.ones(2), torch.float32)])
            w.add("norm.weight", record, tensors)
            w.add_file("tokenizer_config.json", f"{delta}/delta_config.json")
            w.finish({})
        deltahub.apply(delta, f"{root}/apply-{mask:o}", progress=False)
        deltahub.export_lora(delta, f"{root}/lora-{mask:o}", progress=False)
    """
)


def test_outputs_get_the_umask_permissions(delta, tmp_path):
    p = subprocess.run([sys.executable, "-c", PERMISSIONS, str(delta), str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    for mask in (0o022, 0o002):
        for kind in ("writer", "apply", "lora"):
            out = tmp_path / f"{kind}-{mask:o}"
            assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask, (out, oct(out.stat().st_mode))
            files = list(out.rglob("*"))
            assert files
            for f in files:
                want = (0o777 if f.is_dir() else 0o666) & ~mask
                assert stat.S_IMODE(f.stat().st_mode) == want, (f, oct(f.stat().st_mode))
