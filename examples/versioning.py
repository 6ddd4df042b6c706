"""The Hub as version history: push v1, push v2, log, load v1 by tag, roll back to v1.

Against the real Hub (after `hf auth login`):
    python examples/versioning.py --repo YOUR_NAME/my-delta

Offline, against the local Hub test double that deltahub's tests use:
    python examples/versioning.py --local-hub
(or start it yourself with `python -m tests.hub_server`, export what it prints, and pass --repo user/NAME)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="demo-user/versioned-delta")
    ap.add_argument("--local-hub", action="store_true", help="start the local Hub test double (tests/hub_server.py)")
    args = ap.parse_args()
    server = None
    if args.local_hub:
        # huggingface_hub reads these when first imported, so set them before importing deltahub.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from hub_server import HubServer, reserve_port

        port = reserve_port()
        os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_local_example")
        os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="deltahub-example-hf-")
        server = HubServer(port=port).start()

    import torch
    import transformers

    import deltahub
    from deltahub import DeltaModel

    work = Path(tempfile.mkdtemp(prefix="deltahub-versioning-"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(work / "base")
    model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def train(steps: int) -> None:
        for _ in range(steps):
            x = torch.randint(0, 128, (4, 32)) * 2
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

    # The base here is made on the spot, so it has no Hub id: push says so and refuses unless
    # allow_local_base=True. With a base from the Hub (or compress(..., base_id="org/name")), drop it.
    # v1: a first fine-tune
    train(10)
    model.to(torch.bfloat16).save_pretrained(work / "ft-v1")
    model.float()
    deltahub.compress(work / "base", work / "ft-v1", work / "delta-v1", ratio=1 / 8, progress=False)
    print(deltahub.push(work / "delta-v1", args.repo, message="v1: 10 steps", allow_local_base=True))

    # v2: the same run, trained further
    train(10)
    model.to(torch.bfloat16).save_pretrained(work / "ft-v2")
    deltahub.compress(work / "base", work / "ft-v2", work / "delta-v2", ratio=1 / 8, progress=False)
    print(deltahub.push(work / "delta-v2", args.repo, message="v2: 20 steps", allow_local_base=True))

    hist = deltahub.history(args.repo)
    for v in hist.versions:
        if v.method:
            print(f"  {', '.join(v.tags):4s} {v.commit[:8]}  {v.message:14s} {v.method} ratio {v.ratio}")
    print(" ", hist.summary())

    v1 = DeltaModel.from_pretrained(args.repo, revision="v1")
    deltahub.rollback(args.repo, to="v1")
    head = DeltaModel.from_pretrained(args.repo)
    same = all(torch.equal(a, b) for a, b in zip(v1.state_dict().values(), head.state_dict().values()))
    print(f"rolled back to v1; the head loads to the same weights as v1: {same}")
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
