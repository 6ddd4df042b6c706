"""Bounded fuzzing of what deltahub reads from a delta repo alone: only success or a
``DeltahubError`` may come out, and nothing may allocate past a capped address space.

Starts from real records, shards and a real repo (tools/fuzz.py builds them) and mutates them
with hypothesis: wrong types, huge, negative and fractional numbers, nested junk, missing keys.
``python tools/fuzz.py --minutes 10`` runs the same targets for longer.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import fuzz  # noqa: E402  (tools/fuzz.py)
from deltahub import DeltahubError  # noqa: E402
from deltahub.format import CONFIG_NAME, INDEX_NAME  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

# Junk drawn by hypothesis: JSON scalars, with integers at the edges that overflow or allocate.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**36, 2**53, 2**63, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(fuzz.JUNK[:60]),
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
# Each edit: which value (an index into the object's paths), and what happens to it.
EDITS = st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.sampled_from(["junk", "delete", "nudge"]), JSON, st.integers(-3, 3)), min_size=1, max_size=3)

def fuzz_settings(examples: int) -> settings:
    return settings(deadline=None, derandomize=True, database=None, max_examples=examples, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The real repo of tools/fuzz.py (every component type, several shards) and its bases."""
    return fuzz.seed_repo(tmp_path_factory.mktemp("fuzz"))


def apply_edits(obj, edits):
    for pick, how, value, step in edits:
        paths = fuzz.paths_of(obj)
        path = paths[1:][pick % (len(paths) - 1)] if len(paths) > 1 else ()
        if how == "delete" and path:
            obj = fuzz.set_at(obj, path, None, delete=True)
            continue
        if how == "nudge":
            current = obj
            for k in path:
                current = current[k]
            if isinstance(current, int) and not isinstance(current, bool):
                value = current + step if step else current * 2**31
        obj = fuzz.set_at(obj, path, value)
    return obj


@contextmanager
def capped_memory(extra_gib: float = 3.0):
    """RLIMIT_AS at what this process maps now plus ``extra_gib``, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    fuzz.limit_address_space(extra_gib)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def only_typed(run) -> None:
    try:
        run()
    except DeltahubError:
        pass


@fuzz_settings(300)
@given(which=st.integers(0, 100), edits=EDITS)
def test_mutated_records(seeded, which, edits):
    repo, _ = seeded
    records = json.loads((repo / CONFIG_NAME).read_text())["tensors"]
    name = sorted(records)[which % len(records)]
    record = apply_edits(records[name], edits)
    with capped_memory():
        only_typed(lambda: fuzz.run_record(record, name))


@fuzz_settings(150)
@given(which=st.integers(0, 100), edits=EDITS, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4), cut=st.integers(0, 10**6) | st.none())
def test_mutated_shards(seeded, tmp_path_factory, which, edits, flips, cut):
    repo, _ = seeded
    shards = sorted(p for p in repo.iterdir() if p.name.endswith(".safetensors"))
    header, body = fuzz._split_shard(shards[which % len(shards)].read_bytes())
    data = bytearray(fuzz._join_shard(apply_edits(header, edits), body))
    for i, b in flips:
        data[i % len(data)] = b
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path_factory.mktemp("shard") / "delta-00001-of-00001.safetensors"
    path.write_bytes(bytes(data))
    with capped_memory():
        only_typed(lambda: fuzz.run_shard(path))


@fuzz_settings(60)
@given(target=st.sampled_from(["record", "config", "index", "shard"]), which=st.integers(0, 100), edits=EDITS)
def test_mutated_repos(seeded, tmp_path_factory, target, which, edits):
    seed, bases = seeded
    repo = tmp_path_factory.mktemp("repo") / "delta"
    shutil.copytree(seed, repo)
    cfg = json.loads((repo / CONFIG_NAME).read_text())
    if target == "record":
        name = sorted(cfg["tensors"])[which % len(cfg["tensors"])]
        cfg["tensors"][name] = apply_edits(cfg["tensors"][name], edits)
        (repo / CONFIG_NAME).write_text(json.dumps(cfg))
    elif target == "config":
        (repo / CONFIG_NAME).write_text(json.dumps(apply_edits({k: v for k, v in cfg.items() if k != "tensors"}, edits) | {"tensors": cfg["tensors"]}))
    elif target == "index":
        index = json.loads((repo / INDEX_NAME).read_text())
        (repo / INDEX_NAME).write_text(json.dumps(apply_edits(index, edits)))
    else:
        shards = sorted(p for p in repo.iterdir() if p.name.endswith(".safetensors"))
        shard = shards[which % len(shards)]
        header, body = fuzz._split_shard(shard.read_bytes())
        shard.write_bytes(fuzz._join_shard(apply_edits(header, edits), body))
        fuzz._reseal(repo)
    with capped_memory():
        only_typed(lambda: fuzz.run_repo(repo, bases))


def test_the_fuzzer_finds_untyped_errors(seeded):
    """The property can fail: an untyped exception inside a target is reported, not swallowed."""
    case = fuzz.Case("record", {}, lambda: {}["missing"])
    assert isinstance(fuzz.outcome(case), KeyError)
    rng = random.Random(0)
    record = json.loads((seeded[0] / CONFIG_NAME).read_text())["tensors"]["m.layers.0.a.weight"]
    assert fuzz.mutate_json(record, rng) != record
