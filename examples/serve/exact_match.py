#!/usr/bin/env python3
"""A served evaluator: scores a JSONL task file ({"prompt", "answer"} lines, an optional
{"settings": {...}} first line) against an OpenAI-compatible endpoint, by exact match of the
greedy completion, and prints {"score": x}. Standard library only.

    evaluator = ["python3", "serve/exact_match.py", "{base_url}", "{model_name}", "tasks/alpha.fitness.jsonl"]
    serve = true
"""

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def complete(base_url, model, prompt, max_tokens, stop):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stop:
        body["stop"] = stop
    req = urllib.request.Request(
        f"{base_url}/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["choices"][0]["text"]


def main():
    base_url, model, task = sys.argv[1:4]
    settings, lines = {}, []
    with open(task) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if "settings" in row:
                settings = row["settings"]
            else:
                lines.append(row)
    max_tokens = settings.get("max_new_tokens", 32)
    stop = settings.get("stop", [])
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda r: complete(base_url, model, r["prompt"], max_tokens, stop), lines))
    right = sum(t.strip() == r["answer"].strip() for t, r in zip(texts, lines))
    print(json.dumps({"score": right / len(lines)}))


if __name__ == "__main__":
    main()
