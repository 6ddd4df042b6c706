"""Chains on the Hub (tests/hub_server.py): versions pushed against their parent, listed with
it, pulled with it, rolled back to; and a Trainer run versioned by DeltaCallback."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

import deltahub
from deltahub import DeltaModel
from deltahub.hub import MissingParentError

from conftest import HUB_TOKEN
from model_pairs import VOCAB, build, finetune, save


def _repo(kind: str = "run") -> str:
    return f"tester/{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def hub_run(hub, tmp_path_factory):
    """A base on the test Hub and three checkpoints of a low-learning-rate run."""
    root = tmp_path_factory.mktemp("chain-hub")
    model = build("llama")
    base = save(model, root / "base", torch.bfloat16)
    base_repo = _repo("base")
    api = HfApi(token=HUB_TOKEN)
    api.create_repo(base_repo)
    api.upload_folder(repo_id=base_repo, folder_path=str(base))
    finetune(model, steps=3, lr=3e-3)
    ckpts = [save(model, root / "ckpt0", torch.bfloat16)]
    for k in (1, 2):
        finetune(model, steps=1, lr=2e-5, seed=20 + k)
        ckpts.append(save(model, root / f"ckpt{k}", torch.bfloat16))
    return root, base_repo, ckpts


def test_push_log_pull_and_rollback_a_chain(hub_run, tmp_path):
    root, base_repo, ckpts = hub_run
    repo = _repo()
    deltahub.compress(base_repo, ckpts[0], tmp_path / "v0", method="lossless", ratio=None, token=HUB_TOKEN, progress=False)
    r0 = deltahub.push(tmp_path / "v0", repo, token=HUB_TOKEN)
    deltahub.compress(None, ckpts[1], tmp_path / "v1", method="lossless", ratio=None, parent=repo, parent_revision="v1", token=HUB_TOKEN, progress=False)
    cfg = json.loads((tmp_path / "v1" / "delta_config.json").read_text())
    assert cfg["parent"]["name_or_path"] == repo and cfg["parent"]["revision"] == r0.commit  # the tag resolved to its commit
    r1 = deltahub.push(tmp_path / "v1", repo, token=HUB_TOKEN)
    deltahub.compress(None, ckpts[2], tmp_path / "v2", method="lossless", ratio=None, parent=repo, parent_revision=r1.commit, token=HUB_TOKEN, progress=False)
    r2 = deltahub.push(tmp_path / "v2", repo, token=HUB_TOKEN)

    hist = deltahub.history(repo, token=HUB_TOKEN)
    by_tag = {v.tags[0]: v for v in hist.versions if v.tags}
    assert by_tag["v1"].parent is None and by_tag["v1"].depth == 0
    assert by_tag["v2"].parent == f"{repo}@{r0.commit}" and by_tag["v3"].parent == f"{repo}@{r1.commit}" and by_tag["v3"].depth == 2
    assert hist.stored_bytes < hist.full_model_bytes

    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["log", repo, "--token", HUB_TOKEN])
    assert out.exit_code == 0, out.output
    line = next(l for l in out.output.splitlines() if l.startswith("v3"))
    assert line.split()[-2:] == ["v2", f"{base_repo}@{by_tag['v1'].base.split('@')[1]}"], out.output  # the parent by its tag

    # pull brings the parents into the cache: the newest version then loads with downloads off.
    deltahub.pull(repo, revision="v3", token=HUB_TOKEN)
    loaded = DeltaModel.from_pretrained(repo, revision="v3", local_files_only=True, token=HUB_TOKEN).state_dict()
    expected = load_file(ckpts[2] / "model.safetensors")
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)

    # Rolling back to a chain member needs no --force (its samples are its parent's, not the base's).
    rb = deltahub.rollback(repo, to="v2", token=HUB_TOKEN)
    assert rb.tag == "v4"
    loaded = DeltaModel.from_pretrained(repo, revision="v4", token=HUB_TOKEN).state_dict()
    expected = load_file(ckpts[1] / "model.safetensors")
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)


def test_a_version_whose_parent_is_not_on_the_hub_is_not_pushed(hub_run, tmp_path):
    root, base_repo, ckpts = hub_run
    deltahub.compress(base_repo, ckpts[0], tmp_path / "v0", method="lossless", ratio=None, token=HUB_TOKEN, progress=False)
    deltahub.compress(None, ckpts[1], tmp_path / "v1", method="lossless", ratio=None, parent=tmp_path / "v0", progress=False)
    repo = _repo()
    with pytest.raises(MissingParentError, match="push the parent version first"):
        deltahub.push(tmp_path / "v1", repo, token=HUB_TOKEN)
    assert not HfApi(token=HUB_TOKEN).repo_exists(repo)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, VOCAB // 2, (24,), generator=g) * 2
        return {"input_ids": x, "labels": x}


def test_a_trainer_run_becomes_versions_that_load_bit_exactly(hub_run, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from deltahub.integrations import DeltaCallback

    root, base_repo, _ = hub_run
    repo = _repo()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % 2 == 0:
                snapshots[state.global_step] = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_repo, token=HUB_TOKEN, dtype=torch.float32)
    callback = DeltaCallback(repo, base=base_repo, every=2, keyframe_every=2, dtype=torch.bfloat16, token=HUB_TOKEN)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-4, save_strategy="no",
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[Snapshot(), callback]).train()
    assert [v["tag"] for v in callback.versions] == ["step-2", "step-4", "step-6"]
    assert [v["keyframe"] for v in callback.versions] == [True, False, True]
    hist = deltahub.history(repo, token=HUB_TOKEN)
    by_tag = {v.tags[0]: v for v in hist.versions if v.tags}
    assert by_tag["step-4"].parent == f"{repo}@{by_tag['step-2'].commit}" and by_tag["step-6"].parent is None
    assert by_tag["step-4"].message.startswith("step 4, epoch") and "loss" in by_tag["step-4"].message
    for step in (2, 4, 6):
        loaded = DeltaModel.from_pretrained(repo, revision=f"step-{step}", token=HUB_TOKEN).state_dict()
        assert all(torch.equal(loaded[n], snapshots[step][n]) for n in loaded if n in snapshots[step]), step


def test_a_failed_upload_is_tried_again_then_raised(hub, hub_run, tmp_path):
    """The Hub refuses every commit: the version's upload fails in the background, is tried
    again at the end of training, and VersionError names the step."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from deltahub.integrations import DeltaCallback, VersionError

    root, base_repo, _ = hub_run
    model = AutoModelForCausalLM.from_pretrained(base_repo, token=HUB_TOKEN, dtype=torch.float32)
    callback = DeltaCallback(_repo(), base=base_repo, every=2, dtype=torch.bfloat16, token=HUB_TOKEN)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    hub.fail_next("POST", r"/commit/", times=2)
    with pytest.raises(VersionError, match="step 2"):
        Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback]).train()


def test_a_pulled_parent_is_recorded_by_its_hub_id(hub_run, tmp_path):
    """A parent given as the folder pull returned (a cache snapshot) is recorded as its repo and
    commit, not as this machine's cache path, so the new version can be pushed."""
    root, base_repo, ckpts = hub_run
    repo = _repo()
    deltahub.compress(base_repo, ckpts[0], tmp_path / "v0", method="lossless", ratio=None, token=HUB_TOKEN, progress=False)
    r0 = deltahub.push(tmp_path / "v0", repo, token=HUB_TOKEN)
    pulled = deltahub.pull(repo, revision="v1", token=HUB_TOKEN)
    deltahub.compress(None, ckpts[1], tmp_path / "v1", method="lossless", ratio=None, parent=pulled, token=HUB_TOKEN, progress=False)
    parent = json.loads((tmp_path / "v1" / "delta_config.json").read_text())["parent"]
    assert (parent["name_or_path"], parent["revision"]) == (repo, r0.commit)
    assert deltahub.push(tmp_path / "v1", repo, token=HUB_TOKEN).tag == "v2"


def _trainer(model, tmp_path, callback, steps: int, **kwargs):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-4, report_to=[],
                             use_cpu=True, disable_tqdm=True, logging_steps=1, **{"save_strategy": "no", **kwargs})
    return Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])


def test_the_callback_refuses_bad_setups_before_training(hub_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltahub.integrations import DeltaCallback, VersionError

    root, base_repo, _ = hub_run
    with pytest.raises(ValueError, match="base_id="):  # a local base nobody could fetch
        DeltaCallback(_repo(), base=root / "base", every=2)
    with pytest.raises(deltahub.UnknownMethodError):
        DeltaCallback(_repo(), base=base_repo, method="bogus")
    model = AutoModelForCausalLM.from_pretrained(base_repo, token=HUB_TOKEN, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VersionError, match="save_strategy is 'no'"):
        _trainer(model, tmp_path, DeltaCallback(_repo(), base=base_repo, token=HUB_TOKEN), 2).train()
    # A repo whose later versions hold this run's tags (a resume from an earlier checkpoint).
    repo = _repo()
    _trainer(model, tmp_path, DeltaCallback(repo, base=base_repo, every=2, dtype=torch.bfloat16, token=HUB_TOKEN), 4).train()
    fresh = AutoModelForCausalLM.from_pretrained(base_repo, token=HUB_TOKEN, dtype=torch.float32)
    with pytest.raises(VersionError, match="already has versions after step 0.*step-2, step-4.*resume-step"):
        _trainer(fresh, tmp_path, DeltaCallback(repo, base=base_repo, every=2, dtype=torch.bfloat16, token=HUB_TOKEN), 4).train()
    assert all(torch.equal(fresh.state_dict()[k], before[k]) for k in before)  # refused before any step
    cb = DeltaCallback(repo, base=base_repo, every=2, dtype=torch.bfloat16, tag="resume-step-{step}", token=HUB_TOKEN)
    _trainer(fresh, tmp_path, cb, 2).train()
    assert [v["tag"] for v in cb.versions] == ["resume-step-2"]


def test_with_on_error_warn_a_lost_version_is_kept_and_training_goes_on(hub, hub_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltahub.integrations import DeltaCallback

    root, base_repo, _ = hub_run
    repo = _repo()
    model = AutoModelForCausalLM.from_pretrained(base_repo, token=HUB_TOKEN, dtype=torch.float32)
    cb = DeltaCallback(repo, base=base_repo, every=2, dtype=torch.bfloat16, token=HUB_TOKEN, on_error="warn", work_dir=tmp_path / "work")
    hub.fail_next("POST", r"/commit/", times=2)  # step 2's push and its retry at step 4
    _trainer(model, tmp_path, cb, 6).train()
    assert [f["step"] for f in cb.failed] == [2] and [v["keyframe"] for v in cb.versions] == [True, True, False]
    kept = Path(cb.failed[0]["folder"])
    assert kept.is_dir() and sorted(p.name for p in (tmp_path / "work").iterdir()) == [kept.name]
    tags = {v.tags[0] for v in deltahub.history(repo, token=HUB_TOKEN).versions if v.tags}
    assert tags == {"step-4", "step-6"}
    assert deltahub.push(kept, repo, tag="step-2", token=HUB_TOKEN).tag == "step-2"  # what the warning says to run


def test_a_local_chain_is_pushed_version_by_version_and_pulled_whole(hub_run, tmp_path):
    """Versions compressed locally (parents as sibling folders) are pushed in order: each push
    names the repo's version with its parent's weights. A pull into a fresh cache then brings
    parents and base, and the newest version loads with downloads off."""
    root, base_repo, ckpts = hub_run
    deltahub.compress(base_repo, ckpts[0], tmp_path / "v0", method="lossless", ratio=None, token=HUB_TOKEN, progress=False)
    deltahub.compress(None, ckpts[1], tmp_path / "v1", ratio=None, parent=tmp_path / "v0", progress=False)
    local_cfg = (tmp_path / "v1" / "delta_config.json").read_bytes()
    assert json.loads(local_cfg)["parent"]["name_or_path"] == "../v0"
    repo = _repo()
    r0 = deltahub.push(tmp_path / "v0", repo, token=HUB_TOKEN)
    r1 = deltahub.push(tmp_path / "v1", repo, token=HUB_TOKEN)
    assert (tmp_path / "v1" / "delta_config.json").read_bytes() == local_cfg  # the local folder is left as it is
    hist = {v.tags[0]: v for v in deltahub.history(repo, token=HUB_TOKEN).versions if v.tags}
    assert hist["v2"].parent == f"{repo}@{r0.commit}" and hist["v2"].commit == r1.commit
    cache = tmp_path / "fresh-cache"
    deltahub.pull(repo, revision="v2", token=HUB_TOKEN, cache_dir=cache)
    loaded = DeltaModel.from_pretrained(repo, revision="v2", local_files_only=True, cache_dir=cache).state_dict()
    expected = load_file(ckpts[1] / "model.safetensors")
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)


def test_set_parent_points_a_version_at_its_parent_on_the_hub(hub_run, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    root, base_repo, ckpts = hub_run
    deltahub.compress(base_repo, ckpts[0], tmp_path / "a" / "v0", method="lossless", ratio=None, token=HUB_TOKEN, progress=False)
    deltahub.compress(None, ckpts[1], tmp_path / "b" / "v1", ratio=None, parent=tmp_path / "a" / "v0", progress=False)
    repo = _repo()
    r0 = deltahub.push(tmp_path / "a" / "v0", repo, token=HUB_TOKEN)
    runner = CliRunner()
    r = runner.invoke(app, ["set-parent", str(tmp_path / "b" / "v1"), f"{repo}@v1", "--token", HUB_TOKEN])
    assert r.exit_code == 0 and f"parent is now {repo}@{r0.commit}" in r.output, r.output
    r = runner.invoke(app, ["set-parent", str(tmp_path / "b" / "v1"), str(tmp_path / "b" / "v1")])  # itself: other weights
    assert r.exit_code == 1 and "other weights" in r.output
    r = runner.invoke(app, ["compress", base_repo, str(ckpts[1]), str(tmp_path / "x"), "-m", "lossless", "-r", "1/8", "--token", HUB_TOKEN])
    assert r.exit_code == 2 and "natural size" in r.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("tag", ["{0}", "{steps}", "fixed", "refs/heads/main-{step}", "{step.__class__}"])
def test_a_tag_format_that_cannot_name_each_version_is_refused_at_once(hub_run, tag):
    from deltahub.integrations import DeltaCallback

    root, base_repo, _ = hub_run
    with pytest.raises(ValueError, match="tag"):
        DeltaCallback(_repo(), base=base_repo, every=2, tag=tag)
