#!/usr/bin/env python3
"""transformers' bf16 logits of the bf16 reference model, for tests/cpu_isa.rs.

The shared test data holds transformers' float32 logits (weights upcast). This computes the same
prompts with the model loaded in bfloat16, as transformers runs a bf16 checkpoint by default on a
CPU (bf16 matmuls with f32 accumulation, bf16 activations between ops), and writes
tests/data/llama-bf16/<model>.safetensors: `logits_<i>` (float32 `[len(ids), vocab]`).

    python3 scripts/transformers_bf16_reference.py [--testdata ../shared/testdata]
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

MODELS = ["tiny-gqa-bf16"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "llama-bf16")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--testdata", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testdata"))
    args = p.parse_args()
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    for name in MODELS:
        d = os.path.join(args.testdata, "llama", name)
        expected = json.load(open(os.path.join(d, "expected.json")))
        f32 = load_file(os.path.join(d, "expected.safetensors"))
        model = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        out = {}
        prompts = expected["prompts"] if isinstance(expected, dict) else expected
        for i, e in enumerate(prompts):
            ids = torch.tensor([e["ids"]])
            with torch.inference_mode():
                logits = model(ids).logits[0].float()
            out[f"logits_{i}"] = logits.contiguous()
            ref = f32[f"logits_{i}"]
            print(f"{name} prompt {i}: transformers bf16 vs f32 max |Δlogit| = "
                  f"{(logits - ref).abs().max().item():.3e} (max |logit| {ref.abs().max().item():.3f})")
        save_file(out, os.path.join(OUT, f"{name}.safetensors"),
                  metadata={"torch": torch.__version__, "transformers": transformers.__version__,
                            "dtype": "bfloat16", "device": "cpu"})


if __name__ == "__main__":
    main()
