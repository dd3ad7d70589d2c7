#!/usr/bin/env python3
"""The engine's `bench --shape llama3-8b` workloads through PyTorch on the same GPU, and the
ratio of the engine's numbers to these.

    cycleqd-engine bench --device cuda --out engine.json
    python3 scripts/torch_side_by_side.py --engine engine.json --out torch.json

Workloads (same shapes, rank and oversampling as the engine):
  * factorize: torch.svd_lowrank(A, q=rank+10, niter=2) on Llama-3-8B's matrix shapes, with its
    relative error against the optimal rank-r error from the exact singular values;
  * materialize: (1 - sum a) * base + sum a_e * expert_e + U diag(c) V^T in bf16 (f32 low-rank
    product), one layer's 7 matrices, as GB/s of the same bytes the engine counts;
  * decode: transformers' generate (greedy, random-init LlamaForCausalLM in bf16, sdpa) after a
    128-token prompt, at batch 1, 64 and 256.
Needs torch with CUDA and transformers (the GPU machine has both); no network.
"""
import argparse
import json
import time

import torch

RANK, OVERSAMPLE, POWER_ITERS, EXPERTS = 256, 10, 2, 3
SHAPES = {  # one Llama-3-8B layer, then the lm_head
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
    "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def timed(fn, iters=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def task_vector(m, n, gen):
    k = 32
    u = torch.randn(m, k, device="cuda", generator=gen)
    v = torch.randn(n, k, device="cuda", generator=gen)
    decay = 0.9 ** torch.arange(k, device="cuda")
    return (u * decay) @ v.T + 0.01 * torch.randn(m, n, device="cuda", generator=gen)


def factorize(gen):
    out = []
    for name, (m, n) in SHAPES.items():
        a = task_vector(m, n, gen)
        secs = timed(lambda: torch.svd_lowrank(a, q=RANK + OVERSAMPLE, niter=POWER_ITERS), 3)
        u, s, v = torch.svd_lowrank(a, q=RANK + OVERSAMPLE, niter=POWER_ITERS)
        approx = (u[:, :RANK] * s[:RANK]) @ v[:, :RANK].T
        err = (torch.linalg.norm(a - approx) / torch.linalg.norm(a)).item()
        sv = torch.linalg.svdvals(a)
        optimal = (torch.sqrt((sv[RANK:] ** 2).sum()) / torch.sqrt((sv ** 2).sum())).item()
        out.append({"matrix": name, "shape": [m, n], "seconds": secs, "error": err, "optimal_error": optimal})
    # Llama-3-8B has 32 of each per layer matrix, plus lm_head (128256 x 4096) and embeddings.
    per_model = 32 * sum(o["seconds"] for o in out)
    return {"per_matrix": out, "seconds_224_layer_matrices": per_model}


def materialize(gen):
    total_bytes, total_secs = 0, 0.0
    for name, (m, n) in SHAPES.items():
        base = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        experts = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                   for _ in range(EXPERTS)]
        u = torch.randn(m, EXPERTS * RANK, device="cuda", generator=gen) * 0.01
        vt = torch.randn(EXPERTS * RANK, n, device="cuda", generator=gen) * 0.01
        c = torch.full((EXPERTS * RANK,), 0.5, device="cuda")
        a = [0.3, 0.4, 0.5]
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def run():
            acc = base.float() * (1 - sum(a))
            for w, e in zip(a, experts):
                acc.add_(e.float(), alpha=w)
            acc.addmm_(u * c, vt)
            out.copy_(acc)

        total_secs += timed(run)
        total_bytes += (EXPERTS + 2) * m * n * 2 + EXPERTS * (m + n) * RANK * 4
    return {"seconds_one_layer": total_secs, "gb_per_s": total_bytes / total_secs / 1e9}


def decode():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    out = {}
    for batch in (1, 64, 256):
        ids = torch.randint(0, cfg.vocab_size, (batch, 128), device="cuda")
        steps = 32

        def run():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False, pad_token_id=0)

        secs = timed(run, 2)
        # The prefill that generate does: no autograd graph (generate runs without one; a plain
        # call would keep every activation and run out of memory at batch 256), last logits only.
        with torch.inference_mode():
            prefill = timed(lambda: model(ids, logits_to_keep=1), 2)
        out[f"decode batch {batch}"] = batch * steps / max(secs - prefill, 1e-9)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--engine", help="the engine's `bench --json`/`--out` report")
    p.add_argument("--out", help="write this script's numbers as JSON")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save():
        # After every part, so a part that fails leaves the others' numbers behind.
        if args.out:
            json.dump(res, open(args.out, "w"), indent=2)

    res["factorize"] = factorize(gen)
    save()
    res["materialize"] = materialize(gen)
    save()
    torch.cuda.empty_cache()
    if not args.skip_decode:
        res["decode_tok_s"] = decode()
        save()
    print(json.dumps(res, indent=2))
    if args.engine:
        engine = {o["op"]: o for o in json.load(open(args.engine))["ops"]}
        print("\nengine / torch (higher is better for the engine):")
        mat = engine.get("materialize resident")
        if mat:
            print(f"  materialize resident: {mat['rate'] / res['materialize']['gb_per_s']:.2f}x "
                  f"({mat['rate']:.0f} vs {res['materialize']['gb_per_s']:.0f} GB/s)")
        fac = next((o for n, o in engine.items() if n.startswith("factorize")), None)
        if fac:
            print(f"  factorize: engine {fac['seconds']:.1f} s for {fac['detail']['matrices']} "
                  f"matrices (host upload included) vs torch.svd_lowrank "
                  f"{res['factorize']['seconds_224_layer_matrices']:.1f} s for 224 (on the GPU)")
        for name, tok_s in res.get("decode_tok_s", {}).items():
            if name in engine:
                print(f"  {name}: {engine[name]['rate'] / tok_s:.2f}x "
                      f"({engine[name]['rate']:.0f} vs {tok_s:.0f} tok/s)")


if __name__ == "__main__":
    main()
