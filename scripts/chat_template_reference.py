#!/usr/bin/env python3
"""Writes the chat-template reference vectors in tests/data/chat/ with transformers itself.

For each template in tests/data/chat/templates/ (written for these tests in the style of the
Llama 3, Llama 3.1, Mistral, ChatML/Qwen, Gemma and Phi-3 families) and each conversation below,
it records what `tokenizer.apply_chat_template` renders (with and without the generation
prompt), the token ids it gives (`tokenize=True`), or the error the template raises.
The tokenizer is ../shared/testdata/tokenizer/tokenizer.json with the templates' control
tokens added as special tokens.

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install transformers jinja2
    /tmp/tf/bin/python scripts/chat_template_reference.py

Each template is stored the way checkpoints store them: llama3 as chat_template.jinja, mistral
as a list of named templates in tokenizer_config.json, the others as a string there.
"""

import datetime
import json
import shutil
import tempfile
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "chat"
SHARED_TOKENIZER = ROOT.parent / "shared" / "testdata" / "tokenizer" / "tokenizer.json"

CONTROL_TOKENS = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
    "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|image|>", "[INST]", "[/INST]",
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello, how are you?"}],
    "multi": [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": " Write a haiku. "},
        {"role": "assistant", "content": "Leaves fall \"softly\"\nOn the pond \u2014 \u00e9 \u2713"},
        {"role": "user", "content": "Again, with 'quotes'."},
    ],
    "tools": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius", "days": 2}}}]},
        {"role": "tool", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"},
        {"role": "user", "content": "Thanks"},
    ],
    "parts": [{"role": "user", "content": [
        {"type": "text", "text": "Describe "}, {"type": "image"}, {"type": "text", "text": " this."}]}],
    "nulls_and_reasoning": [
        {"role": "user", "content": "2+2?", "name": None},
        {"role": "assistant", "content": "4", "reasoning_content": "\nadd them\n", "tool_calls": None},
        {"role": "user", "content": "3+3?"},
    ],
    "not_alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}

# Which conversations each template is tried on (the ones its family is used with).
CASES = {
    "llama3": ["single", "multi", "nulls_and_reasoning"],
    "llama31": ["single", "multi", "tools"],
    "mistral": ["single", "multi", "not_alternating", "nulls_and_reasoning"],
    "chatml": ["single", "multi", "tools", "nulls_and_reasoning"],
    "gemma": ["single", "multi", "not_alternating"],
    "phi3": ["single", "multi", "parts"],
}

SPECIAL = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama31": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<|begin_of_text|>", "<|end_of_text|>"),
    "chatml": (None, "<|im_end|>"),
    "gemma": ("<|begin_of_text|>", "<end_of_turn>"),
    "phi3": ("<|begin_of_text|>", "<|end|>"),
}


def tokenizer_json() -> Path:
    tok = tokenizers.Tokenizer.from_file(str(SHARED_TOKENIZER))
    tok.add_special_tokens(CONTROL_TOKENS)
    path = OUT / "tokenizer.json"
    tok.save(str(path))
    return path


def model_dir(name: str, template: str, tok_path: Path, where: Path) -> None:
    """The files a checkpoint would hold for this template, in `where`."""
    bos, eos = SPECIAL[name]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
    if bos is not None:
        config["bos_token"] = {"content": bos, "special": True, "__type": "AddedToken"}
    if name == "llama3":
        (where / "chat_template.jinja").write_text(template)
    elif name == "mistral":
        config["chat_template"] = [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": template},
        ]
    else:
        config["chat_template"] = template
    (where / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    shutil.copy(tok_path, where / "tokenizer.json")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok_path = tokenizer_json()
    date = datetime.datetime.now().strftime("%d %b %Y")
    for name, convs in CASES.items():
        template = (OUT / "templates" / f"{name}.jinja").read_text()
        case_dir = OUT / name
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir()
        with tempfile.TemporaryDirectory() as tmp:
            model_dir(name, template, tok_path, Path(tmp))
            tok = AutoTokenizer.from_pretrained(tmp)
            cases = []
            for conv in convs:
                messages = CONVERSATIONS[conv]
                case = {"conversation": conv, "messages": messages}
                try:
                    for gen in (True, False):
                        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                        case["text_generation_prompt" if gen else "text"] = text
                    case["ids_generation_prompt"] = tok.apply_chat_template(
                        messages, tokenize=True, add_generation_prompt=True, return_dict=False)
                except Exception as e:  # the template's own raise_exception
                    case = {"conversation": conv, "messages": messages, "error": str(e)}
                cases.append(case)
            # Files of the checkpoint, except the shared tokenizer.json.
            for f in Path(tmp).iterdir():
                if f.name != "tokenizer.json":
                    shutil.copy(f, case_dir / f.name)
        expected = {
            "transformers": transformers.__version__,
            "date_rendered": date,
            "cases": cases,
        }
        (case_dir / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
        print(name, [c.get("error", "ok")[:40] for c in cases])


if __name__ == "__main__":
    main()
