"""
Sample from a real LLaMA checkpoint (llama2.c .bin, Meta or Hugging Face folder), as llama2.c's sample.py:

    python sample.py                                   # stories260K, greedy, from "Once upon a time"
    python sample.py --model babyllama936K --temperature 0.8 --top-p 0.9
    python sample.py --checkpoint /models/llama-2-7b --tokenizer /models/tokenizer.model --device cuda
    python sample.py --model smollm2-135M --chat "What is the capital of France?"
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch

from checkpoints import load_checkpoint
from bpe import load_tokenizer
from llama import DTYPES, MODELS, resolve_device


def main(argv=None):
    data = Path(os.environ.get("LORA_DA_DATA") or Path(__file__).resolve().parent.parent / "shared" / "data")
    p = argparse.ArgumentParser(description="Sample from a LLaMA checkpoint (llama2.c .bin, GGUF, Meta or Hugging "
                                "Face folder).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="stories260K", choices=sorted(MODELS),
                   help=f"a real model by name, read from {data} (--checkpoint and --tokenizer override it)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or folder (default: the --model's)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model, GGUF file or tokenizer.json (default: "
                                                     "the --model's)")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue (BOS is prepended where the "
                                                                "tokenizer adds one)")
    p.add_argument("--chat", default=None, help="a user message for an instruct model (ChatML, as SmolLM2's "
                                                "template): prints the assistant's answer, ending at <|im_end|>")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampler")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 0 or not (math.isfinite(args.temperature) and args.temperature >= 0):
            raise ValueError(f"--max-new-tokens and --temperature must be finite and >= 0, got "
                             f"{args.max_new_tokens} and {args.temperature}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        device = resolve_device(args.device)
        checkpoint, tokenizer = (data / f for f in MODELS[args.model])
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
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
