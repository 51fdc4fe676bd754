"""
Sample from a real LLaMA checkpoint (llama2.c .bin, Meta or Hugging Face folder), as llama2.c's sample.py:

    python sample.py                                   # stories260K, greedy, from "Once upon a time"
    python sample.py --model babyllama936K --temperature 0.8 --top-p 0.9
    python sample.py --checkpoint /models/llama-2-7b --tokenizer /models/tokenizer.model --device cuda
    python sample.py --model smollm2-135M --chat "What is the capital of France?"
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from checkpoints import load_checkpoint
from cli import Number, boundary
from bpe import load_tokenizer
from llama import DTYPES, MODELS, resolve_device


DATA = Path(os.environ.get("LORA_DA_DATA") or Path(__file__).resolve().parent.parent / "shared" / "data")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample from a LLaMA checkpoint (llama2.c .bin, GGUF, Meta or Hugging "
                                "Face folder).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="stories260K", choices=sorted(MODELS),
                   help=f"a real model by name, read from {DATA} (--checkpoint and --tokenizer override it)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or folder (default: the --model's)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model, GGUF file or tokenizer.json (default: "
                                                     "the --model's)")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue (BOS is prepended where the "
                                                                "tokenizer adds one)")
    p.add_argument("--chat", default=None, help="a user message for an instruct model (ChatML, as SmolLM2's "
                                                "template): prints the assistant's answer, ending at <|im_end|>")
    p.add_argument("--max-new-tokens", type=Number(int, 0, 10 ** 6, "an integer in [0, 1e6]"), default=256,
                   help="most tokens to generate")
    p.add_argument("--temperature", type=Number(float, 0.0, 1e6, "in [0, 1e6]"), default=0.0,
                   help="0 is greedy decoding (so is a temperature too small for fp32 logits)")
    p.add_argument("--top-p", type=Number(float, 2 ** -24, 1.0, "in (0, 1]"), default=None,
                   help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=Number(int, 0, 2 ** 63 - 1, "an integer in [0, 2^63 - 1]"), default=1337,
                   help="seed of the sampler")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")
    return p


def parse_args(argv=None):
    """The command line, every check that needs no file: the parser's ranges, then empty paths."""
    p = parser()
    args = p.parse_args(argv)
    for name in ("checkpoint", "tokenizer"):
        if getattr(args, name) is not None and not getattr(args, name).strip():  # "" is not "not given"
            p.error(f"--{name} is empty: give a path, or leave the flag out for the --model's")
    return args


def main(argv=None):
    args = parse_args(argv)
    boundary(lambda: sample(args))


def sample(args):
    device = resolve_device(args.device)
    checkpoint, tokenizer = (DATA / f for f in MODELS[args.model])
    tok = load_tokenizer(args.tokenizer or tokenizer)
    model = load_checkpoint(args.checkpoint or checkpoint, device=device, dtype=DTYPES[args.dtype])
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model expects {model.args.vocab_size}")
    if args.chat is not None and not hasattr(tok, "chat"):
        raise ValueError("--chat needs an instruct model's byte-level BPE tokenizer (e.g. --model smollm2-135M)")
    ids = tok.chat(args.chat) if args.chat is not None else tok.encode(args.prompt, bos=True)
    if len(ids) >= model.args.max_seq_len:
        raise ValueError(f"the prompt is {len(ids)} tokens and fills the model's context of "
                         f"{model.args.max_seq_len}: nothing can be generated; shorten it")
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.tensor([ids], device=device)
    new = list(model.generate(x, args.max_new_tokens, args.temperature, args.top_p,
                              stop_ids=(tok.eos_id, tok.bos_id), generator=gen))
    print(tok.decode(new) if args.chat is not None else tok.decode(ids + new))
    if len(new) < args.max_new_tokens and len(ids) + len(new) >= model.args.max_seq_len:
        print(f"note: stopped after {len(new)} tokens at the model's context of {model.args.max_seq_len}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
