"""One vLLM engine in this process (vLLM spawns its workers: the ``__main__`` guard is needed):
``python tests/vllm_serving/serve_once.py MODEL [deltahub] [--dtype D] [--revision R] [--base B]``
prints one ``RESULT {json}`` line with the greedy tokens and the log-probabilities of three
prompts. ``deltahub``: MODEL is a delta repo, served with the deltahub load and config formats
(``--base``: the loader's ``base`` option). ``TP``/``PP`` in the environment: tensor parallel ranks, pipeline stages."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

PROMPTS = ["Store, share, version and load", "deltahub keeps each fine-tune as", "The base is the one recorded in"]


def _digests(worker) -> dict:
    """SHA-256 of each parameter this rank holds (run in each worker by ``collective_rpc``)."""
    import hashlib

    model = worker.model_runner.model
    return {n: hashlib.sha256(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("fmt", nargs="?")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--revision")
    parser.add_argument("--base")
    parser.add_argument("--digests", action="store_true", help="print each rank's weight digests instead of generating")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    kwargs = {"load_format": "deltahub", "config_format": "deltahub"} if args.fmt == "deltahub" else {}
    if args.base:
        kwargs["model_loader_extra_config"] = {"base": args.base}
    tp = int(os.environ.get("TP", "1"))  # tensor parallel ranks (on a CPU: VLLM_CPU_OMP_THREADS_BIND gives each its cores)
    pp = int(os.environ.get("PP", "1"))  # pipeline stages
    llm = LLM(model=args.model, revision=args.revision, dtype=args.dtype, enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
              tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)
    startup = time.perf_counter() - t0
    if args.digests:
        print("RESULT " + json.dumps({"digests": llm.collective_rpc(_digests)}), flush=True)
        return
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    result = {
        "startup_s": round(startup, 1),
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        # The chosen token's logprob at each step, as text so that the comparison is exact.
        "logprobs": [[repr(step[t].logprob) for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs],
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
