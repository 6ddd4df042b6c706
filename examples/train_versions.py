"""A training run versioned as it trains: DeltaCallback pushes a version every few steps, each
stored against the previous one (a keyframe against the base every few versions), and every
version loads bit for bit.

Against the real Hub (after `hf auth login`; the base must be on the Hub):
    python examples/train_versions.py --repo YOUR_NAME/my-run --base HuggingFaceTB/SmolLM2-135M

Offline, against the local Hub test double that deltahub's tests use (a tiny model made here):
    python examples/train_versions.py --local-hub
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="demo-user/training-run")
    ap.add_argument("--base", default=None, help="base model on the Hub (default with --local-hub: a tiny Llama uploaded to it)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--local-hub", action="store_true", help="start the local Hub test double (tests/hub_server.py)")
    args = ap.parse_args()
    if args.local_hub:
        # huggingface_hub reads these when first imported, so set them before importing deltahub.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from hub_server import HubServer, reserve_port

        port = reserve_port()
        os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_local_example")
        os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="deltahub-example-hf-")
        HubServer(port=port).start()

    import torch
    import transformers
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import deltahub
    from deltahub import DeltaModel
    from deltahub.integrations import DeltaCallback

    work = Path(tempfile.mkdtemp(prefix="deltahub-train-versions-"))
    base = args.base
    if base is None:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "base")
        base = "demo-user/tiny-base"
        HfApi().create_repo(base, exist_ok=True)
        HfApi().upload_folder(repo_id=base, folder_path=str(work / "base"))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 256

        def __getitem__(self, i: int) -> dict:
            x = torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(i)) * 2
            return {"input_ids": x, "labels": x}

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # Every 3 steps a version; every 4th version a keyframe against the base. bf16 versions, as a
    # bf16 save_pretrained would write them; a low learning rate, as in RL updates, leaves most
    # bf16 values unchanged between versions.
    callback = DeltaCallback(args.repo, base=base, every=args.every, keyframe_every=4, dtype=torch.bfloat16)
    targs = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=args.steps, per_device_train_batch_size=8, learning_rate=2e-5, save_strategy="no",
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=targs, train_dataset=Tokens(), callbacks=[callback]).train()

    for v in callback.versions:
        kind = "keyframe (against the base)" if v["keyframe"] else "against the previous version"
        print(f"  {v['tag']:8s} {v['stored_bytes'] / 1024:8.1f} KiB  {kind}, encoded in {v['encode_seconds']:.2f} s")
    hist = deltahub.history(args.repo)
    print(" ", hist.summary())
    last = callback.versions[-1]["tag"]
    loaded = DeltaModel.from_pretrained(args.repo, revision=last)
    trained = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    same = all(torch.equal(loaded.state_dict()[k], trained[k]) for k in loaded.state_dict() if k in trained)
    print(f"  {args.repo}@{last} loads bit for bit equal to the trained model: {same}")


if __name__ == "__main__":
    main()
