#!/usr/bin/env python3
"""Reference merges from mergekit itself, for tests/merge_methods.rs.

Writes tests/data/merge/: four tiny float32 Llama checkpoints (`base`, `expert_a`, `expert_b`,
`expert_c`: hidden 16, 4 layers, 2 heads, 1 KV head, vocabulary 32, untied lm_head; each expert
the base plus a dense random task vector; `expert_v` and `expert_w`, two of them with other
tokenizers), one mergekit configuration per case in `cases/`, and what `mergekit-yaml` wrote from
each in `mergekit_out/<case>/` (weights and config.json; tokenizer.json for the tokenizer cases).

Run with a Python that has mergekit 0.1.5 (and torch, transformers):
    python3 scripts/mergekit_reference.py [--mergekit-yaml PATH]
The random methods run with `--random-seed 42`; PYTHONHASHSEED=0 fixes mergekit's set orders.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "merge")
H, I, L, V = 16, 24, 4, 32
SEED = 42

GTA = """merge_method: {method}
base_model: base
dtype: float32
models:
  - model: expert_a
    parameters: {{weight: [1.0, 0.5], density: {da}{extra_a}}}
  - model: expert_b
    parameters:
      weight:
        - {{filter: mlp, value: 0.3}}
        - {{value: 0.7}}
      density: {db}{extra_b}
  - model: expert_c
    parameters: {{weight: -0.4, density: {dc}}}
parameters:
  lambda: 0.8
  int8_mask: true{flags}
"""

CASES = {
    "linear": """merge_method: linear
dtype: float32
models:
  - {model: expert_a, parameters: {weight: [1.0, 0.2]}}
  - model: expert_b
    parameters: {weight: [{filter: self_attn, value: 2.0}, {value: 0.5}]}
  - {model: expert_c, parameters: {weight: 0.3}}
parameters: {normalize: true}
""",
    "linear_unnormalized": """merge_method: linear
base_model: base
dtype: float32
models:
  - {model: base, parameters: {weight: 0.5}}
  - {model: expert_a, parameters: {weight: 0.25}}
  - {model: expert_b, parameters: {weight: 0.5}}
parameters: {normalize: false}
""",
    "task_arithmetic": GTA.format(method="task_arithmetic", da="1.0", db="1.0", dc="1.0", extra_a="", extra_b="", flags=""),
    "ties": GTA.format(method="ties", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a="", extra_b="", flags=""),
    "ties_rescaled": GTA.format(method="ties", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a="", extra_b="",
                                flags="\n  normalize: false\n  rescale: true"),
    "dare_linear": GTA.format(method="dare_linear", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a="", extra_b="", flags=""),
    "dare_ties": GTA.format(method="dare_ties", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a="", extra_b="",
                            flags="\n  rescale: false\n  normalize: true"),
    "breadcrumbs": GTA.format(method="breadcrumbs", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a=", gamma: 0.05",
                              extra_b="\n      gamma: 0.1", flags=""),
    "breadcrumbs_ties": GTA.format(method="breadcrumbs_ties", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a=", gamma: 0.05",
                                   extra_b="", flags="\n  rescale: true"),
    "della": GTA.format(method="della", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a=", epsilon: 0.1",
                        extra_b="\n      epsilon: 0.2", flags=""),
    "della_linear": GTA.format(method="della_linear", dc="0.6", da="0.5", db="[0.3, 0.7]", extra_a=", epsilon: 0.1",
                               extra_b="", flags="\n  rescale: false"),
    "model_stock": """merge_method: model_stock
base_model: base
dtype: float32
models: [{model: expert_a}, {model: expert_b}, {model: expert_c}]
""",
    "model_stock_filter_wise": """merge_method: model_stock
base_model: base
dtype: float32
models: [{model: expert_a}, {model: expert_b}]
parameters: {filter_wise: true}
""",
    "sce": """merge_method: sce
base_model: base
dtype: float32
models: [{model: expert_a}, {model: expert_b}, {model: expert_c}]
parameters: {select_topk: 0.5}
""",
    "slerp": """merge_method: slerp
base_model: base
dtype: float32
models: [{model: base}, {model: expert_a}]
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 1]}
    - {filter: mlp, value: [1, 0.5, 0]}
    - {value: [0.3, 0.6]}
""",
    "nuslerp": """merge_method: nuslerp
base_model: base
dtype: float32
models:
  - {model: expert_a, parameters: {weight: 0.3}}
  - {model: expert_b, parameters: {weight: [0.7, 1.0]}}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
""",
    "nuslerp_flat": """merge_method: nuslerp
dtype: float32
models:
  - {model: expert_a, parameters: {weight: 0.6}}
  - {model: expert_c, parameters: {weight: 0.4}}
""",
    "multislerp": """merge_method: multislerp
base_model: base
dtype: float32
models:
  - {model: expert_a, parameters: {weight: 0.5}}
  - {model: expert_b, parameters: {weight: [0.2, 0.8]}}
  - {model: expert_c, parameters: {weight: 0.3}}
""",
    "multislerp_nobase": """merge_method: multislerp
dtype: float32
models:
  - {model: expert_a, parameters: {weight: 1.0}}
  - {model: expert_b, parameters: {weight: 2.0}}
parameters: {normalize_weights: false}
""",
    "karcher": """merge_method: karcher
dtype: float32
models: [{model: expert_a}, {model: expert_b}, {model: expert_c}]
parameters: {max_iter: 20, tol: 1.0e-6}
""",
    "passthrough": """merge_method: passthrough
dtype: float32
slices:
  - sources: [{model: expert_a, layer_range: [0, 2]}]
  - sources:
      - {model: expert_b, layer_range: [1, 4], parameters: {scale: [{filter: down_proj, value: 0.5}]}}
  - sources: [{model: expert_c, layer_range: [0, 1]}]
""",
    "slices_slerp": """merge_method: slerp
base_model: base
dtype: float32
parameters: {t: [0.2, 0.8]}
slices:
  - sources: [{model: base, layer_range: [0, 1]}, {model: expert_a, layer_range: [0, 1]}]
  - sources: [{model: base, layer_range: [1, 4]}, {model: expert_a, layer_range: [1, 4]}]
    parameters: {t: 0.9}
""",
    # The output vocabulary: the union (rows for tokens only one model has, averaged rows for
    # tokens several non-base models have), and one model's, padded.
    "union_ties": """merge_method: ties
base_model: base
dtype: float32
models:
  - {model: expert_a, parameters: {weight: 0.6, density: 0.5}}
  - {model: expert_v, parameters: {weight: 0.4, density: 0.7}}
tokenizer_source: union
""",
    "union_linear": """merge_method: linear
dtype: float32
models:
  - {model: expert_a, parameters: {weight: 0.2}}
  - {model: expert_v, parameters: {weight: 0.4}}
  - {model: expert_w, parameters: {weight: 0.4}}
tokenizer_source: union
""",
    "tokenizer_model": """merge_method: task_arithmetic
base_model: base
dtype: float32
models:
  - {model: expert_a, parameters: {weight: 0.5}}
  - {model: expert_v, parameters: {weight: 0.5}}
tokenizer:
  source: expert_v
  pad_to_multiple_of: 8
""",
}

TOKENIZER_CASES = {"union_ties", "union_linear", "tokenizer_model"}


def tokenizer(path, extra=(), swap=False, special=()):
    """The shared WordLevel vocabulary (`w3`…`w31`), plus `extra` regular tokens and `special`
    added tokens after it; `swap` exchanges the ids of `w3` and `w4`."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, V)})
    if swap:
        vocab["w3"], vocab["w4"] = 4, 3
    vocab.update({t: V + i for i, t in enumerate(extra)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    fast.save_pretrained(path)


def tensors(g, scale):
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    sd = {"model.embed_tokens.weight": r(V, H) * scale}
    for l in range(L):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = r(H) * 0.1 * scale
        sd[p + "post_attention_layernorm.weight"] = r(H) * 0.1 * scale
        sd[p + "self_attn.q_proj.weight"] = r(H, H) * 0.2 * scale
        sd[p + "self_attn.k_proj.weight"] = r(H // 2, H) * 0.2 * scale
        sd[p + "self_attn.v_proj.weight"] = r(H // 2, H) * 0.2 * scale
        sd[p + "self_attn.o_proj.weight"] = r(H, H) * 0.2 * scale
        sd[p + "mlp.gate_proj.weight"] = r(I, H) * 0.2 * scale
        sd[p + "mlp.up_proj.weight"] = r(I, H) * 0.2 * scale
        sd[p + "mlp.down_proj.weight"] = r(H, I) * 0.2 * scale
    sd["model.norm.weight"] = r(H) * 0.1 * scale
    sd["lm_head.weight"] = r(V, H) * scale
    return sd


def write_model(name, sd, **tok):
    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    vocab_size = sd["model.embed_tokens.weight"].shape[0]
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, dtype="float32")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()},
              os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    tokenizer(d, **tok)


def with_vocab(sd, g, extra, swap):
    """`sd` with `extra` more token rows (random) and, with `swap`, rows 3 and 4 exchanged, so
    that a token keeps its embedding under the tokenizer's ids."""
    out = dict(sd)
    for k in ["model.embed_tokens.weight", "lm_head.weight"]:
        t = sd[k].clone()
        if swap:
            t[[3, 4]] = t[[4, 3]]
        out[k] = torch.cat([t, torch.randn(extra, H, generator=g, dtype=torch.float64).to(t.dtype)])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml") or "mergekit-yaml")
    a = ap.parse_args()
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    g = torch.Generator().manual_seed(SEED)
    base = tensors(g, 1.0)
    for k in base:
        if "norm" in k:
            base[k] = base[k] + 1.0
    write_model("base", base)
    experts = {}
    for name in ["expert_a", "expert_b", "expert_c"]:
        delta = tensors(g, 0.1)
        expert = {k: (base[k] + delta[k]).to(torch.float32) for k in base}
        # Equal magnitudes would make the methods' orderings (mergekit's sorts are not stable)
        # a matter of tie-breaking: refuse them.
        for k, v in expert.items():
            d = (v - base[k].to(torch.float32)).abs().numpy()
            rows = d[None] if d.ndim == 1 else d
            assert all(len(np.unique(r)) == len(r) for r in rows), f"{name} {k}: tied magnitudes"
            assert len(np.unique(d)) == d.size, f"{name} {k}: tied magnitudes"
        write_model(name, expert)
        experts[name] = expert
    # Two experts with other tokenizers: `expert_v` (expert_c's weights) has `x0`, `x1` and the
    # special `<|im_end|>` after the shared tokens, and w3/w4 at each other's ids; `expert_w`
    # (expert_b's) has `x0` and `y0`.
    write_model("expert_v", with_vocab(experts["expert_c"], g, 3, True),
                extra=["x0", "x1"], swap=True, special=["<|im_end|>"])
    write_model("expert_w", with_vocab(experts["expert_b"], g, 2, False), extra=["x0", "y0"])
    os.makedirs(os.path.join(ROOT, "cases"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    for case, text in CASES.items():
        cfg = os.path.join(ROOT, "cases", f"{case}.yml")
        with open(cfg, "w") as f:
            f.write(text)
        tmp = os.path.join(ROOT, f".out-{case}")
        cmd = [a.mergekit_yaml, os.path.join("cases", f"{case}.yml"), tmp, "--random-seed", str(SEED),
               "--no-write-model-card", "--quiet"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{case}: mergekit failed:\n{r.stderr[-4000:]}")
        out = os.path.join(ROOT, "mergekit_out", case)
        os.makedirs(out)
        for f in ["model.safetensors", "config.json", "tokenizer.json"]:
            if f != "tokenizer.json" or case in TOKENIZER_CASES:
                shutil.copy(os.path.join(tmp, f), os.path.join(out, f))
        shutil.rmtree(tmp)
        print(case, "ok")
    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write("Written by scripts/mergekit_reference.py with mergekit 0.1.5 (CPU, float32, "
                f"`--random-seed {SEED}`, PYTHONHASHSEED=0); see that script for what is here.\n")


if __name__ == "__main__":
    main()
