"""Helpers the test files share (imported by name; conftest.py holds the fixtures)."""
import torch


def padded_samples(n, T=24, seed=0, vocab=512):
    """Right-padded sequences of different lengths, one label token each (an SST-2-like shape)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, T + 1, (), generator=g))
        tokens = torch.full((T,), 2)
        tokens[:length] = torch.randint(3, vocab, (length,), generator=g)
        tokens[0] = 1
        targets = torch.full((T,), -100)
        targets[length - 2] = tokens[length - 1]  # the last token is the "label"
        out.append({"tokens": tokens, "targets": targets, "attention_mask": torch.arange(T) < length})
    return out
