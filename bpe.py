"""
A byte-level BPE tokenizer (GPT-2's scheme, as SmolLM2 and most recent LLaMA-architecture models use),
read from a GGUF file's tokenizer.ggml.* metadata or from a Hugging Face tokenizer.json, behind the same
small interface as llama.Tokenizer (encode, decode, vocab_size, bos_id, eos_id, unk_id, pad_id).

    text -> (special pieces, only where asked) -> pre-tokens (a regex split) -> UTF-8 bytes -> one printable
    character per byte (GPT-2's byte <-> unicode map) -> merges applied by rank -> ids

The split is the model's (tokenizer.ggml.pre): "smollm" isolates every number character, then GPT-2's pattern
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
Python's re has no \\p{L} or \\p{N}: the classes are built here from unicodedata (every code point whose
category is L* or N*), so the split is exact for the Unicode version of this Python's unicodedata
(3.11: Unicode 14.0) and can differ only on characters assigned later (tests/test_bpe.py states it).
"""
import json
import re
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import checkpoints
import llama

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+"  # {L}: \p{L}'s body
PRE_TOKENIZERS = {"smollm": ("digits", GPT2_SPLIT), "gpt2": (None, GPT2_SPLIT), "default": (None, GPT2_SPLIT)}


@lru_cache(maxsize=None)
def unicode_class(prefix: str) -> str:
    """The body of a regex character class of every code point whose Unicode category starts with `prefix`
    ("L": letters, "N": numbers), as ranges: what \\p{L} and \\p{N} mean, for Python's re."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    esc = lambda c: re.escape(chr(c))
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


@lru_cache(maxsize=None)
def split_pattern(pre: str):
    """The compiled pre-tokenizer of tokenizer.ggml.pre `pre`: (digit splitter or None, main pattern)."""
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer pre-tokenizer {pre!r} is not implemented (known: {', '.join(PRE_TOKENIZERS)})")
    digits, main = PRE_TOKENIZERS[pre]
    L, N = unicode_class("L"), unicode_class("N")
    return (re.compile(f"[{N}]") if digits else None), re.compile(main.replace("{L}", L).replace("{N}", N))


def bytes_to_unicode() -> dict:
    """GPT-2's map from each byte to a printable character: the printable Latin-1 bytes stand for themselves,
    the other 68 (controls, space, ...) are shifted to 256 + k, so every byte sequence is a visible string."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


class BPETokenizer:
    """tokens: the vocabulary (id -> piece), merges: "a b" strings in rank order, types: llama.cpp's token types
    (1 normal, 3 control, 4 user-defined, ...), special ids; add_bos: whether a sequence starts with BOS."""

    CONTROL, USER_DEFINED = 3, 4

    def __init__(self, tokens, merges, types=None, bos_id=None, eos_id=None, unk_id=None, pad_id=None,
                 add_bos=False, pre="gpt2", chat_template=None, source="tokenizer"):
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{source}: the vocabulary must be a non-empty list of strings")
        self.source, self.pieces, self.pre = source, list(tokens), pre
        self.ids = {t: i for i, t in enumerate(self.pieces)}
        if len(self.ids) != len(self.pieces):
            raise ValueError(f"{source}: the vocabulary lists a piece twice")
        self.types = list(types) if types is not None else [1] * len(self.pieces)
        self.ranks = {}
        for rank, m in enumerate(merges):
            a, sep, b = m.partition(" ") if isinstance(m, str) else (m[0], " ", m[1])
            if not sep or a + b not in self.ids:
                raise ValueError(f"{source}: merge {rank} {m!r} is not 'a b' with a+b in the vocabulary")
            self.ranks[(a, b)] = rank
        self.vocab_size = len(self.pieces)
        for name, v in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id)):
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"{source}: {name} id {v} is outside the vocabulary of {self.vocab_size}")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.unk_id = unk_id if unk_id is not None else -1     # byte-level: no text is ever unknown
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos, self.chat_template = add_bos, chat_template
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.special = sorted((p for p, t in zip(self.pieces, self.types) if t in (self.CONTROL, self.USER_DEFINED)),
                              key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, self.special))) if self.special else None
        self.digits, self.split = split_pattern(pre)
        self._cache = {}

    # --- reading -----------------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict, source="GGUF"):
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; this reader "
                             f"implements byte-level BPE (gpt2) only")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if not isinstance(meta.get(key), list):
                raise ValueError(f"{source}: missing {key}")
        g = lambda k: meta.get(f"tokenizer.ggml.{k}")
        return cls(g("tokens"), g("merges"), g("token_type"), g("bos_token_id"), g("eos_token_id"),
                   g("unknown_token_id"), g("padding_token_id"), bool(g("add_bos_token")), g("pre") or "default",
                   meta.get("tokenizer.chat_template"), source)

    @classmethod
    def from_gguf(cls, path):
        meta, _, _ = checkpoints.read_gguf(path)
        return cls.from_gguf_metadata(meta, str(path))

    @classmethod
    def from_tokenizer_json(cls, path, pre="smollm"):
        """A Hugging Face tokenizer.json (model.type BPE, byte-level): vocab, merges, added tokens."""
        try:
            tj = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark is allowed
            model = tj["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ValueError(f"{path}: model.type is {model.get('type') if isinstance(model, dict) else model!r}; "
                             f"only BPE is implemented")
        vocab, added_tokens = model.get("vocab"), tj.get("added_tokens", [])
        if not (isinstance(vocab, dict) and vocab and all(isinstance(k, str) and type(v) is int and 0 <= v < 10 ** 7
                                                          for k, v in vocab.items())):
            raise ValueError(f"{path}: model.vocab must be a non-empty object of piece -> id (ids 0 .. 10^7)")
        if not (isinstance(added_tokens, list) and all(isinstance(a, dict) and type(a.get("id")) is int and
                                                       0 <= a["id"] < 10 ** 7 and isinstance(a.get("content"), str)
                                                       for a in added_tokens)):
            raise ValueError(f"{path}: added_tokens must be a list of {{\"id\": int, \"content\": str}} objects")
        if not isinstance(model.get("merges", []), list) or not all(
                isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))
                for m in model.get("merges", [])):
            raise ValueError(f"{path}: model.merges must be a list of 'a b' strings or [a, b] pairs")
        tokens = [None] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            tokens[i] = piece
        types = [1] * len(tokens)
        for added in added_tokens:
            while added["id"] >= len(tokens):
                tokens.append(None)
                types.append(1)
            tokens[added["id"]] = added["content"]
            types[added["id"]] = cls.CONTROL if added.get("special") else cls.USER_DEFINED
        if any(t is None for t in tokens):
            raise ValueError(f"{path}: the vocabulary has gaps (ids without a piece)")
        merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
        ids = {t: i for i, t in enumerate(tokens)}
        find = lambda name: ids.get(name)
        return cls(tokens, merges, types, find("<|im_start|>"), find("<|im_end|>"), find("<|endoftext|>"),
                   find("<|im_end|>"), False, pre, None, str(path))

    def gguf_metadata(self) -> dict:
        """The tokenizer.ggml.* keys that rebuild this tokenizer (for a GGUF export)."""
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": self.pre, "tokenizer.ggml.tokens": self.pieces,
                "tokenizer.ggml.token_type": self.types,
                "tokenizer.ggml.merges": [f"{a} {b}" for (a, b), _ in sorted(self.ranks.items(), key=lambda kv: kv[1])],
                "tokenizer.ggml.add_bos_token": self.add_bos}
        for key, v in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id),
                       ("unknown_token_id", self.unk_id if self.unk_id >= 0 else None), ("padding_token_id", self.pad_id)):
            if v is not None:
                meta[f"tokenizer.ggml.{key}"] = v
        if self.chat_template:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta

    # --- encoding ----------------------------------------------------------------------------------------
    def pre_tokens(self, text: str) -> list:
        """The pre-tokenizer's pieces of a text without special pieces."""
        chunks = [text]
        if self.digits is not None:  # every number character on its own (HF: Digits(individual_digits=True))
            chunks = [p for c in chunks for p in re.split(f"({self.digits.pattern})", c) if p]
        return [m.group() for c in chunks for m in self.split.finditer(c)]

    def bpe(self, word: str) -> list:
        """One pre-token (as byte characters) -> its pieces: repeatedly merge the adjacent pair of lowest rank."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 62), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 62:
                break
            a, b = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of this pair, left to right
                if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        if len(self._cache) < 100_000:
            self._cache[word] = parts
        return parts

    def encode_ordinary(self, text: str) -> list:
        ids = []
        for pre in self.pre_tokens(text):
            word = "".join(self.byte_char[b] for b in pre.encode("utf-8"))
            for piece in self.bpe(word):
                if piece in self.ids:
                    ids.append(self.ids[piece])
                elif self.unk_id >= 0:  # a byte the vocabulary lacks (SmolLM2: 21 of 256): <unk>, counted by tasks
                    ids.append(self.unk_id)
                else:
                    raise ValueError(f"{self.source}: piece {piece!r} of {pre!r} is not in the vocabulary")
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = False) -> list:
        """Text -> ids. bos: begin as the model expects a sequence to begin (BOS only where the tokenizer adds
        one: SmolLM2's does not); special: match special pieces (<|im_start|>, ...) in the text, else they are
        ordinary text."""
        ids = [self.bos_id] if bos and self.add_bos and self.bos_id is not None else []
        if special and self.special_re is not None:
            pos = 0
            for m in self.special_re.finditer(text):
                ids += self.encode_ordinary(text[pos:m.start()]) + [self.ids[m.group()]]
                pos = m.end()
            ids += self.encode_ordinary(text[pos:])
        else:
            ids += self.encode_ordinary(text)
        return ids + ([self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids) -> str:
        """Ids -> text: special pieces as their text, the byte characters back to bytes, then UTF-8 (a sequence
        cut inside a character decodes it as U+FFFD)."""
        out, buf = [], bytearray()
        for i in ids:
            piece = self.pieces[int(i)]
            if self.types[int(i)] in (self.CONTROL, self.USER_DEFINED):
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(piece)
            else:
                buf += bytes(self.char_byte[c] for c in piece)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    # --- chat --------------------------------------------------------------------------------------------
    DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    def chat(self, user: str, system: str = None) -> list:
        """ChatML, as SmolLM2's template writes it (a system line first, then the user turn, then the opening of
        the assistant's): <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n. Hand-written for
        this one form; generation stops at <|im_end|> (eos)."""
        system = self.DEFAULT_SYSTEM if system is None else system
        text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n")
        return self.encode(text, bos=False, special=True)


def load_tokenizer(path):
    """The tokenizer at `path`, by what the file is: a GGUF model file (its byte-level BPE), a Hugging Face
    tokenizer.json, or a sentencepiece .model (llama.Tokenizer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (expected a sentencepiece .model, a GGUF file or a "
                                f"tokenizer.json)")
    if checkpoints.is_gguf(path):
        return BPETokenizer.from_gguf(path)
    if path.suffix == ".json":
        return BPETokenizer.from_tokenizer_json(path)
    return llama.Tokenizer(path)
