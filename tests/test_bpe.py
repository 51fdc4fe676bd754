"""The byte-level BPE tokenizer (bpe.py) read from SmolLM2's GGUF file: it round-trips any UTF-8 text, gives
the ids an independent reader gives, splits like the model's pre-tokenizer (and says where Python's re alone
would not), matches special pieces only where asked, and reads a Hugging Face tokenizer.json the same way."""
import json
import re
import unicodedata

import pytest

import bpe

SMOL = "smollm2-135M/SmolLM2-135M-Instruct.Q4_1.gguf"
ODD = ["", " ", "\n\n\t  x", "naïve café — 日本語の文章 ²³ ½ Ⅻ 😀👍🏽", "e\u0301 (e + combining acute)", "a\u200bb",
       "\x00\x01 control bytes", "'s 've 'LL 're", "   leading and trailing   ", "١٢٣ Arabic-Indic digits",
       "<|im_start|> looks special but is text", "ﬁ ligature, ǅ titlecase, ß", "\U0001F9D1\u200D\U0001F4BB ZWJ"]


@pytest.fixture(scope="module")
def tok(data):
    path = data / SMOL
    if not path.is_file():
        pytest.skip(f"{SMOL} not in the data folder (../shared/data/README.md says where it comes from)")
    return bpe.BPETokenizer.from_gguf(path)


def test_the_file_vocabulary_and_special_ids(tok):
    assert tok.vocab_size == 49152 and len(tok.ranks) == 48900
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.pieces[1:3] == ["<|im_start|>", "<|im_end|>"] and not tok.add_bos
    # 21 of the 256 byte pieces are missing from this vocabulary: 13 that UTF-8 never uses (C0, C1, F5-FF), the
    # lead bytes F1 and F2 (planes 4-11, unassigned) and six control characters; they encode as <unk> (id 0)
    missing = sorted(b for b, c in tok.byte_char.items() if c not in tok.ids)
    assert missing == [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2] + list(range(0xF5, 0x100))
    assert tok.encode("a\x04b") == tok.encode("a") + [tok.unk_id] + tok.encode("b")


def test_ids_equal_an_independent_readers(tok):
    assert tok.encode("12345 apples") == [33, 34, 35, 36, 37, 13855]  # data README: transformers + gguf


def test_round_trip_over_sst2_gsm8k_and_odd_unicode(tok, data):
    sst2 = [line.rsplit("\t", 1)[0] for line in (data / "sst2" / "dev.tsv").read_text().splitlines()[1:]]
    gsm = [json.loads(line)["question"] for line in (data / "gsm8k" / "test.jsonl").read_text().splitlines()[:300]]
    texts = sst2 + gsm + ODD
    assert len(texts) > 1100
    bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
    assert not bad, bad[:3]


def test_special_pieces_are_matched_only_where_asked(tok):
    text = "<|im_start|>user\nhi<|im_end|>"
    plain, special = tok.encode(text), tok.encode(text, special=True)
    assert 1 not in plain and 2 not in plain and tok.decode(plain) == text
    assert special[0] == 1 and special[-1] == 2 and tok.decode(special) == text
    chat = tok.chat("hi", system="be brief")
    assert tok.decode(chat) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                               "<|im_start|>assistant\n"


def test_unicode_classes_are_exact_where_the_naive_python_class_is_not():
    """\\p{L} and \\p{N} built from unicodedata match every code point's category; Python's nearest built-in
    letter class, [^\\W\\d_], counts other numbers (No: '²', '½') and letter numbers (Nl: 'Ⅻ') as letters, so a
    pre-tokenizer written with it would glue '²' to the word before it. Where this split can still differ from
    the model's own (Oniguruma/ICU) is only on code points assigned after this Python's Unicode version."""
    L = re.compile(f"[{bpe.unicode_class('L')}]")
    N = re.compile(f"[{bpe.unicode_class('N')}]")
    naive = re.compile(r"[^\W\d_]")
    for ch in "aZßǅ日ـ":
        assert L.fullmatch(ch) and not N.fullmatch(ch)
    for ch in "7²½Ⅻ١":
        assert N.fullmatch(ch) and not L.fullmatch(ch)
    assert [ch for ch in "²½Ⅻ" if naive.fullmatch(ch)] == list("²½Ⅻ")  # where the naive class is wrong
    sample = [chr(c) for c in range(0, 0x3000, 7)]
    assert all(bool(L.fullmatch(c)) == unicodedata.category(c).startswith("L") for c in sample)


def test_the_smollm_pre_tokenizer_isolates_each_digit_and_keeps_words_with_their_space(tok):
    assert tok.pre_tokens("I ate 12 apples²!") == ["I", " ate", " ", "1", "2", " apples", "²", "!"]


def test_a_tokenizer_json_reads_as_the_gguf_metadata_does(tok, tmp_path):
    vocab = {p: i for i, p in enumerate(tok.pieces) if tok.types[i] not in (3, 4)}
    added = [{"id": i, "content": p, "special": True} for i, p in enumerate(tok.pieces) if tok.types[i] in (3, 4)]
    merges = [f"{a} {b}" for (a, b), _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": added}))
    other = bpe.BPETokenizer.from_tokenizer_json(path)
    for text in ODD + ["Review: a gorgeous, witty, seductive movie.\nSentiment:", "<|im_end|>"]:
        assert other.encode(text) == tok.encode(text)
        assert other.encode(text, special=True) == tok.encode(text, special=True)
    assert (other.bos_id, other.eos_id, other.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)


@pytest.mark.parametrize("case,fragment", [
    ("merge", "merge 0 'a q' is not 'a b' with a+b in the vocabulary"),
    ("twice", "lists a piece twice"),
    ("bos", "bos id 9 is outside the vocabulary of 3"),
    ("pre", "pre-tokenizer 'qwen2' is not implemented"),
])
def test_a_broken_vocabulary_is_refused_in_one_line(case, fragment):
    tokens, merges, kw = ["a", "b", "ab"], ["a b"], {}
    if case == "merge":
        merges = ["a q"]
    elif case == "twice":
        tokens = ["a", "b", "a"]
    elif case == "bos":
        kw = {"bos_id": 9}
    elif case == "pre":
        kw = {"pre": "qwen2"}
    with pytest.raises(ValueError, match=re.escape(fragment)):
        bpe.BPETokenizer(tokens, merges, **kw)


def test_a_file_that_is_not_a_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        bpe.load_tokenizer(tmp_path / "t.json")


def test_gsm8k_chat_prompt_is_the_users_turn_and_the_solution_ends_the_assistants(tok, data):
    import llama
    import tasks
    import train
    cfg = train.get_args(["--model", "smollm2-135M", "--task", "gsm8k", "--gsm8k-prompt", "chat",
                          "--val-size", "20", "--no-test-eval", "--train-limit", "40"])
    task = tasks.Task(cfg, tok, data, 8192)
    question, solution = task.val[0]
    prompt, answer = task.encode("val", 0)
    assert prompt == tok.chat(question)  # the template the sampler's --chat uses, byte for byte
    assert tok.decode(prompt) == tasks.GSM8K_PROMPTS["chat"].format(system=tok.DEFAULT_SYSTEM, question=question)
    assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]) == solution  # ends at <|im_end|>
    assert task.prompt_record["style"] == "chat"
    qa = tasks.Task(train.get_args(["--task", "gsm8k", "--gsm8k-prompt", "qa", "--val-size", "20", "--no-test-eval",
                                    "--train-limit", "40"]), tok, data, 8192)
    assert tok.decode(qa.encode("val", 0)[0]) == f"Q: {question}\nA: "
    sp = llama.Tokenizer(data / "stories260K" / "tok512.model")  # no chat template: auto is qa, chat refused
    assert tasks.gsm8k_prompt(train.get_args([]), sp) == "qa"
    with pytest.raises(tasks.UsageError, match="needs a tokenizer with a chat template"):
        tasks.Task(train.get_args(["--task", "gsm8k", "--gsm8k-prompt", "chat"]), sp, data, 512)
