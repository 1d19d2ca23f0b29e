#!/usr/bin/env python3
"""Generate a tiny random-weight Llama that real vLLM 0.32 (CPU) can serve.

Nothing can be downloaded on these machines, so the real-vLLM tests need a model
made here: hidden 128, intermediate 256, 2 layers, 2 heads / 2 KV heads, bf16,
a byte-level BPE tokenizer (vocab ~512) trained on a few neutral sentences and a
tiny Jinja chat template, so /v1/completions and /v1/chat/completions both work.

`--head-dim 16` makes the fault model: vLLM loads it and reports ready, then the
first request kills the engine ("Unsupported CPU attention configuration:
head_dim=16"), a real and reproducible engine-death case.

Run it with the vLLM venv's python (it needs torch, transformers, tokenizers).
Idempotent: if OUTDIR/vsup_tiny_model.json records the same spec, nothing is
done. The model is built in a sibling temporary directory and renamed into
place, so an interrupted run never leaves a half-written OUTDIR that looks whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SPEC_FILE = "vsup_tiny_model.json"
SPEC_VERSION = 1  # bump when the generated layout changes, so old outputs are rebuilt

# Neutral text only: the tokenizer is trained on it, and it must never look like a user prompt.
TRAINING_TEXT = [
    "Say hi to the tiny model.",
    "The quick brown fox jumps over the lazy dog.",
    "A small test model answers with a few random tokens.",
    "Hello, world! This is a test of the byte level tokenizer.",
    "user: hello there\nassistant: hi, how can I help?",
    "system: You are a helpful assistant.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ; : ! ? ( ) [ ] { }",
    "The supervisor starts the server, checks health and restarts it when it dies.",
    "Shared memory segments, semaphores and sockets are cleaned after a crash.",
    "One two three four five six seven eight nine ten eleven twelve.",
]

# Each message becomes "<s>role: content</s>\n"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ bos_token }}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}"
)

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]  # ids 0, 1, 2 (trainer puts specials first)


def spec_for(args: argparse.Namespace) -> dict:
    """The parameters that define the output; a mismatch means 'rebuild'."""
    return {
        "spec_version": SPEC_VERSION,
        "name": args.name,
        "seed": args.seed,
        "head_dim": args.head_dim,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB_SIZE,
        "dtype": "bfloat16",
    }


def already_built(outdir: Path, spec: dict) -> bool:
    spec_path = outdir / SPEC_FILE
    if not (outdir / "config.json").is_file() or not spec_path.is_file():
        return False
    try:
        return json.loads(spec_path.read_text()) == spec
    except (OSError, ValueError):
        return False


def build_tokenizer(tmp: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(tmp)
    return fast


def build_model(tmp: Path, spec: dict, tokenizer) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    heads = spec["num_attention_heads"]
    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=spec["num_key_value_heads"],
        head_dim=spec["head_dim"],
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--name", required=True, help="recorded in the spec file (e.g. tiny-a)")
    p.add_argument(
        "--head-dim",
        type=int,
        choices=(64, 16),
        default=64,
        help="64 = healthy; 16 = loads, then the first request kills the engine",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the spec matches")
    args = p.parse_args(argv)

    outdir: Path = args.outdir.resolve()
    spec = spec_for(args)
    if not args.force and already_built(outdir, spec):
        print(f"[make_tiny_model] {args.name}: up to date at {outdir}", flush=True)
        return 0

    t0 = time.monotonic()
    print(
        f"[make_tiny_model] {args.name}: building in {outdir} (seed {args.seed}, head_dim {args.head_dim})",
        flush=True,
    )
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
    try:
        tokenizer = build_tokenizer(tmp)
        print(
            f"[make_tiny_model] {args.name}: tokenizer vocab {len(tokenizer)} ({time.monotonic() - t0:.1f}s)",
            flush=True,
        )
        build_model(tmp, spec, tokenizer)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # noqa: S103 - a model dir other users' servers read
        for f in tmp.iterdir():  # safetensors writes 0600; other users' servers read these
            os.chmod(f, 0o644)
        if outdir.exists():
            shutil.rmtree(outdir)
        os.rename(tmp, outdir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[make_tiny_model] {args.name}: done in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
