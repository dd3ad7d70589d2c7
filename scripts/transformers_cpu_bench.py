#!/usr/bin/env python3
"""CPU throughput reference for a small Llama model using Hugging Face transformers.

This script is the PyTorch/transformers baseline to compare against
cycleqd-engine's CPU Llama path. It builds a *random-weight* LlamaForCausalLM
from a LlamaConfig (nothing is downloaded) with this shape:

    hidden_size 768, num_hidden_layers 12, num_attention_heads 12,
    num_key_value_heads 4 (GQA), intermediate_size 2048, vocab_size 32000,
    tie_word_embeddings True, max_position_embeddings 2048, rope_theta 10000

and measures, under torch.inference_mode() and after a warm-up pass:

  (a) prefill tokens/s for batch 1 and batch 16: one forward over [B, 32]
      random token ids with use_cache=True (full logits for every position
      unless --last-logits-only is given); tokens/s = B * 32 / median time.
  (b) decode tokens/s for batch 1, 16 and 64: after a 32-token prefill,
      --steps single-token forward steps ([B, 1] ids) that reuse
      past_key_values; tokens/s = B / median per-step time.

Timings are medians over repetitions (--prefill-reps for prefill, --steps
for decode). The thread count is set with torch.set_num_threads.

Run (from the repository root):

    /work/pyenv/bin/python scripts/transformers_cpu_bench.py --json
    /work/pyenv/bin/python scripts/transformers_cpu_bench.py --threads 2 --dtype f32

Prints a small table; with --json, also prints one JSON object (last line
of stdout) holding all numbers plus torch/transformers versions, dtype,
thread count and CPU capability. Works with transformers 4.x and 5.x.
On 2 cores a bf16 run takes roughly a minute.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT_LEN = 32
PREFILL_BATCHES = (1, 16)
# 64 is the batch of one child's evaluation workload (64 prompts decoded together).
DECODE_BATCHES = (1, 16, 64)

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def make_config():
    return LlamaConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        hidden_act="silu",
        rms_norm_eps=1e-5,
    )


def rope_theta(config):
    """rope_theta as the model sees it (5.x keeps it in config.rope_parameters)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return rp["rope_theta"]
    return getattr(config, "rope_theta", None)


def build_model(config, dtype):
    """Random-weight model in `dtype`, robust to transformers 4.x / 5.x."""
    model = None
    # transformers 5.x (and late 4.x) accept `dtype=`, older 4.x `torch_dtype=`.
    for kw in ("dtype", "torch_dtype"):
        try:
            model = LlamaForCausalLM._from_config(config, **{kw: dtype})
            break
        except TypeError:
            model = None
        except Exception:
            model = None
    if model is None:
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype)
    model.eval()
    # Make sure the weights really are in the requested dtype.
    for p in model.parameters():
        if p.dtype != dtype:
            raise RuntimeError(f"parameter dtype {p.dtype} != requested {dtype}")
    return model


def forward_kwargs_logits_to_keep(model, last_only):
    """Kwarg that restricts the lm_head to the last position, if requested."""
    if not last_only:
        return {}
    import inspect

    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:  # transformers >= 4.50 / 5.x
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:  # transformers 4.45 - 4.49
        return {"num_logits_to_keep": 1}
    print("warning: this transformers has no logits_to_keep; computing full logits",
          file=sys.stderr)
    return {}


def new_cache():
    """An empty DynamicCache where available (None lets the model create one)."""
    try:
        from transformers import DynamicCache

        return DynamicCache()
    except Exception:
        return None


def prefill(model, ids, extra):
    kwargs = dict(input_ids=ids, use_cache=True)
    cache = new_cache()
    if cache is not None:
        kwargs["past_key_values"] = cache
    kwargs.update(extra)
    return model(**kwargs)


def bench_prefill(model, batch, reps, extra, gen):
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT_LEN), generator=gen)
    prefill(model, ids, extra)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = prefill(model, ids, extra)
        times.append(time.perf_counter() - t0)
        del out
    t = statistics.median(times)
    return {
        "batch": batch,
        "prompt_len": PROMPT_LEN,
        "reps": reps,
        "median_s": t,
        "min_s": min(times),
        "tokens_per_s": batch * PROMPT_LEN / t,
    }


def run_decode(model, batch, steps, extra, gen, timed):
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT_LEN), generator=gen)
    out = prefill(model, ids, extra)
    past = out.past_key_values
    nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        times.append(time.perf_counter() - t0)
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    return times if timed else None


def bench_decode(model, batch, steps, extra, gen):
    run_decode(model, batch, min(4, steps), extra, gen, timed=False)  # warm-up
    times = run_decode(model, batch, steps, extra, gen, timed=True)
    t = statistics.median(times)
    return {
        "batch": batch,
        "prompt_len": PROMPT_LEN,
        "steps": steps,
        "median_step_s": t,
        "min_step_s": min(times),
        "tokens_per_s": batch / t,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--json", action="store_true", help="also print one JSON object")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps (default 16)")
    ap.add_argument("--prefill-reps", type=int, default=3, help="timed prefill reps (default 3)")
    ap.add_argument("--last-logits-only", action="store_true",
                    help="prefill computes logits for the last position only "
                         "(as generate() does); default computes all positions")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]

    t_build = time.perf_counter()
    config = make_config()
    model = build_model(config, dtype)
    build_s = time.perf_counter() - t_build
    n_params = sum(p.numel() for p in model.parameters())
    extra = forward_kwargs_logits_to_keep(model, args.last_logits_only)
    attn_impl = getattr(model.config, "_attn_implementation", None)

    gen = torch.Generator().manual_seed(args.seed)
    results = {"prefill": [], "decode": []}
    t_all = time.perf_counter()
    with torch.inference_mode():
        for b in PREFILL_BATCHES:
            results["prefill"].append(bench_prefill(model, b, args.prefill_reps, extra, gen))
        for b in DECODE_BATCHES:
            results["decode"].append(bench_decode(model, b, args.steps, extra, gen))
    bench_s = time.perf_counter() - t_all

    try:
        cpu_cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        cpu_cap = None

    print(f"torch {torch.__version__}  transformers {transformers.__version__}  "
          f"dtype {args.dtype}  threads {torch.get_num_threads()}  "
          f"attn {attn_impl}  cpu_capability {cpu_cap}")
    print(f"params {n_params / 1e6:.1f}M (tied embeddings)  build {build_s:.1f}s  "
          f"bench {bench_s:.1f}s  prefill logits: "
          f"{'last only' if extra else 'all positions'}")
    print(f"{'phase':<8} {'batch':>5} {'time/iter (ms)':>15} {'tokens/s':>10}")
    for r in results["prefill"]:
        print(f"{'prefill':<8} {r['batch']:>5} {r['median_s'] * 1e3:>15.2f} {r['tokens_per_s']:>10.1f}")
    for r in results["decode"]:
        print(f"{'decode':<8} {r['batch']:>5} {r['median_step_s'] * 1e3:>15.2f} {r['tokens_per_s']:>10.1f}")

    if args.json:
        obj = {
            "bench": "transformers_cpu_bench",
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python_version": platform.python_version(),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "cpu_capability": cpu_cap,
            "attn_implementation": attn_impl,
            "prefill_logits": "last" if extra else "all",
            "n_params": n_params,
            "config": {
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "intermediate_size": config.intermediate_size,
                "vocab_size": config.vocab_size,
                "tie_word_embeddings": config.tie_word_embeddings,
                "max_position_embeddings": config.max_position_embeddings,
                "rope_theta": rope_theta(config),
            },
            "build_s": build_s,
            "bench_s": bench_s,
            "prefill": results["prefill"],
            "decode": results["decode"],
        }
        print(json.dumps(obj))


if __name__ == "__main__":
    main()
