"""Runs engine_vs_transformers' workloads on vLLM's CPU build, in vLLM's own venv and process.

Started by ``benchmarks/engine_vs_transformers.py --vllm-python PY`` (never in CI) as
``PY benchmarks/vllm_peer.py SPEC.json``. SPEC holds the model directory, the thread
binding and the workloads as token ids and generated lengths. The peer loads vLLM, runs
a warm-up, prints ``READY``, then answers each workload name read from stdin with one
``RESULT {"name": ..., "seconds": ...}`` line: the parent interleaves these runs with its
own, so a load swing on a shared machine hits every system alike. Imports only vLLM and
the standard library (kvferry is not installed in that venv). The venv comes from
``/work/shared/peers/setup_vllm_cpu.sh``; dtype is float32 ("auto" would downcast to bf16).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Must be set before vLLM starts its worker: "0-1" binds both cores of a 2-core box
    # (vLLM's default "auto" keeps one core for itself).
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec["threads_bind"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm  # noqa: PLC0415 - after the environment is set
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    llm = LLM(model=spec["model"], dtype="float32", enable_prefix_caching=False, seed=0)

    def run(prompts: list[list[int]], lengths: list[int]) -> float:
        params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in lengths]
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        dt = time.perf_counter() - t
        assert [len(o.outputs[0].token_ids) for o in outs] == lengths
        return dt

    run(spec["warmup"]["prompts"], spec["warmup"]["lengths"])
    print(f"READY {vllm.__version__}", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        w = spec["workloads"][name]
        seconds = run(w["prompts"], w["lengths"])
        print("RESULT " + json.dumps({"name": name, "seconds": seconds}), flush=True)


if __name__ == "__main__":  # vLLM starts worker processes: keep the entry point guarded
    main()
