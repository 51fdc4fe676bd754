"""Every data reader over its whole input range, as one table: for SST-2's tsv, GSM8K's jsonl, --init-data (text
and jsonl), a tokenizer.json and a GGUF file, the same classes of damage (empty file, header only, an empty or
null field, a label outside its set, a byte that is not UTF-8, a byte-order mark, CRLF line ends, an over-long
line, a repeated header, no separator, a missing file). Each is refused in one line naming file:line where a
line is at fault, or read as documented (a BOM and CRLF change nothing; a long line is read whole)."""
import json

import pytest

import bpe
import checkpoints
import tasks

SST2 = "sentence\tlabel\na gorgeous film\t1\na dull one\t0\n"
GSM = ('{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\\n#### 5"}\n'
       '{"question": "Half of 8?", "answer": "8 / 2 = 4\\n#### 4"}\n')
INIT_JSONL = '{"prompt": "Review: fine\\nSentiment:", "answer": " positive"}\n{"prompt": "", "answer": "Once upon"}\n'
INIT_TXT = "once upon a time\nthere was a cat\n"
LONG = "a " * 60000

# reader, file name, case, file content (bytes or text), expected: ("ok", rows) or ("refused", fragment)
READ = {"sst2": (tasks.read_sst2, "train.tsv"), "gsm8k": (tasks.read_gsm8k, "train.jsonl"),
        "init-jsonl": (tasks.read_init_data, "init.jsonl"), "init-txt": (tasks.read_init_data, "init.txt")}
GOOD = {"sst2": (SST2, [("a gorgeous film", 1), ("a dull one", 0)]),
        "gsm8k": (GSM, [("Tom has 2 apples and buys 3. How many?", "2 + 3 = 5\n#### 5"), ("Half of 8?", "8 / 2 = 4\n#### 4")]),
        "init-jsonl": (INIT_JSONL, [("Review: fine\nSentiment:", " positive"), ("", "Once upon")]),
        "init-txt": (INIT_TXT, [("", "once upon a time"), ("", "there was a cat")])}
CASES = [
    ("sst2", "empty file", "", ("refused", "train.tsv:1: expected a GLUE SST-2 tsv with header 'sentence<TAB>label', got an empty file")),
    ("sst2", "header only", "sentence\tlabel\n", ("refused", "train.tsv: no examples after the header")),
    ("sst2", "empty sentence", "sentence\tlabel\n\t1\n", ("refused", "train.tsv:2: empty sentence")),
    ("sst2", "empty label", "sentence\tlabel\ngood\t\n", ("refused", "train.tsv:2: label must be 0 or 1, got ''")),
    ("sst2", "label outside the set", "sentence\tlabel\ngood\t2\n", ("refused", "train.tsv:2: label must be 0 or 1, got '2'")),
    ("sst2", "not UTF-8", b"sentence\tlabel\ngood\t1\nbad \xff\t0\n", ("refused", "train.tsv:3: not valid UTF-8")),
    ("sst2", "byte-order mark", "\ufeff" + SST2, ("ok", None)),
    ("sst2", "CRLF", SST2.replace("\n", "\r\n"), ("ok", None)),
    ("sst2", "over-long line", f"sentence\tlabel\n{LONG}\t1\n", ("ok", [(LONG.strip(), 1)])),
    ("sst2", "repeated header", "sentence\tlabel\nsentence\tlabel\ngood\t1\n", ("refused", "train.tsv:2: label must be 0 or 1, got 'label' (a repeated header?)")),
    ("sst2", "no separator", "sentence\tlabel\na line without its tab\n", ("refused", "train.tsv:2: no tab")),
    ("sst2", "blank line", "sentence\tlabel\ngood\t1\n\nbad\t0\n", ("refused", "train.tsv:3: no tab")),
    ("sst2", "missing file", None, ("refused", "train.tsv: no such file")),
    ("gsm8k", "empty file", "", ("refused", "train.jsonl: no examples")),
    ("gsm8k", "blank lines only", "\n\n", ("refused", "train.jsonl: no examples")),
    ("gsm8k", "empty question", '{"question": "", "answer": "#### 1"}\n', ("refused", "train.jsonl:1: 'question' must be a non-empty string")),
    ("gsm8k", "null answer", '{"question": "q?", "answer": null}\n', ("refused", "train.jsonl:1: 'answer' must be a non-empty string, got None")),
    ("gsm8k", "number question", '{"question": 7, "answer": "#### 7"}\n', ("refused", "train.jsonl:1: 'question' must be a non-empty string, got 7")),
    ("gsm8k", "answer without its marker", '{"question": "q?", "answer": "it is 5"}\n', ("refused", "train.jsonl:1: the answer has no final '#### <number>' marker")),
    ("gsm8k", "missing field", '{"question": "q?"}\n', ("refused", "train.jsonl:1: missing 'answer'")),
    ("gsm8k", "not an object", '["q?", "#### 1"]\n', ("refused", "train.jsonl:1: expected a JSON object with question and answer, got list")),
    ("gsm8k", "not JSON", GSM + '{"question": "cut off\n', ("refused", "train.jsonl:3: not JSON")),
    ("gsm8k", "not UTF-8", GSM.encode() + b'{"question": "\xff", "answer": "#### 1"}\n', ("refused", "train.jsonl:3: not valid UTF-8")),
    ("gsm8k", "byte-order mark", "\ufeff" + GSM, ("ok", None)),
    ("gsm8k", "CRLF", GSM.replace("\n", "\r\n"), ("ok", None)),
    ("gsm8k", "over-long line", json.dumps({"question": LONG, "answer": "#### 1"}) + "\n", ("ok", [(LONG, "#### 1")])),
    ("gsm8k", "missing file", None, ("refused", "train.jsonl: no such file")),
    ("init-jsonl", "empty file", "", ("refused", "init.jsonl: no samples")),
    ("init-jsonl", "empty answer", '{"prompt": "p", "answer": ""}\n', ("refused", "init.jsonl:1: 'answer' must be a non-empty string")),
    ("init-jsonl", "null prompt", '{"prompt": null, "answer": "a"}\n', ("refused", "init.jsonl:1: 'prompt' must be a non-empty string, got None")),
    ("init-jsonl", "not UTF-8", b'{"prompt": "\xfe", "answer": "a"}\n', ("refused", "init.jsonl:1: not valid UTF-8")),
    ("init-jsonl", "byte-order mark", "\ufeff" + INIT_JSONL, ("ok", None)),
    ("init-jsonl", "CRLF", INIT_JSONL.replace("\n", "\r\n"), ("ok", None)),
    ("init-jsonl", "missing file", None, ("refused", "--init-data")),
    ("init-txt", "empty file", "", ("refused", "init.txt: no samples")),
    ("init-txt", "blank lines only", "\n \n\t\n", ("refused", "init.txt: no samples")),
    ("init-txt", "not UTF-8", b"fine\n\x80bad\n", ("refused", "init.txt:2: not valid UTF-8")),
    ("init-txt", "byte-order mark", "\ufeff" + INIT_TXT, ("ok", None)),
    ("init-txt", "CRLF", INIT_TXT.replace("\n", "\r\n"), ("ok", None)),
    ("init-txt", "over-long line", LONG + "\n", ("ok", [("", LONG)])),
    ("init-txt", "missing file", None, ("refused", "init.txt: no such file")),
]


@pytest.mark.parametrize("reader,case,content,expected", CASES, ids=[f"{r}: {c}" for r, c, _, _ in CASES])
def test_a_data_reader_refuses_in_one_line_or_reads_as_documented(reader, case, content, expected, tmp_path):
    read, name = READ[reader]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    kind, want = expected
    if kind == "refused":
        with pytest.raises(ValueError) as e:
            read(path)
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    else:
        assert read(path) == (want if want is not None else GOOD[reader][1])


def test_the_good_files_of_the_table_read_as_written(tmp_path):
    """The table's reference contents themselves: what a BOM or CRLF must leave unchanged."""
    for reader, (text, rows) in GOOD.items():
        read, name = READ[reader]
        (tmp_path / name).write_text(text)
        assert read(tmp_path / name) == rows


def tokenizer_json(**change):
    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
          "added_tokens": [{"id": 3, "content": "<|im_end|>", "special": True}]}
    for key, value in change.items():
        (tj["model"] if key in ("vocab", "merges", "type") else tj)[key] = value
    return json.dumps(tj)


@pytest.mark.parametrize("case,content,fragment", [
    ("empty file", "", "not a Hugging Face tokenizer.json"),
    ("not UTF-8", b'{"model": "\xff"}', "not a Hugging Face tokenizer.json"),
    ("no model", '{"added_tokens": []}', "not a Hugging Face tokenizer.json ('model')"),
    ("model not BPE", tokenizer_json(type="Unigram"), "model.type is 'Unigram'"),
    ("empty vocab", tokenizer_json(vocab={}), "model.vocab must be a non-empty object"),
    ("vocab of lists", tokenizer_json(vocab=["a", "b"]), "model.vocab must be a non-empty object"),
    ("negative id", tokenizer_json(vocab={"a": -1}), "model.vocab must be a non-empty object"),
    ("huge id", tokenizer_json(vocab={"a": 10 ** 12}), "model.vocab must be a non-empty object"),
    ("null content", tokenizer_json(added_tokens=[{"id": 3, "content": None}]), "added_tokens must be a list"),
    ("merges of numbers", tokenizer_json(merges=[1, 2]), "model.merges must be a list"),
    ("gap in ids", tokenizer_json(vocab={"a": 0, "b": 5}), "the vocabulary has gaps"),
])
def test_a_tokenizer_json_reader_refuses_each_damage_in_one_line(case, content, fragment, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        bpe.load_tokenizer(path)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_tokenizer_json_with_a_byte_order_mark_or_crlf_reads_the_same(tmp_path):
    plain, marked = tmp_path / "a.json", tmp_path / "b.json"
    plain.write_text(tokenizer_json())
    marked.write_bytes(b"\xef\xbb\xbf" + tokenizer_json().replace(", ", ",\r\n").encode())
    a, b = bpe.load_tokenizer(plain), bpe.load_tokenizer(marked)
    assert a.pieces == b.pieces and a.encode("abab") == b.encode("abab") == [2, 2]


@pytest.mark.parametrize("case,content,fragment", [
    ("empty file", b"", "not a GGUF file"),
    ("magic only", b"GGUF", "truncated GGUF header"),
    ("a missing file", None, "cannot read"),
    ("a key that is not UTF-8", b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") +
     (1).to_bytes(8, "little") + (2).to_bytes(8, "little") + b"\xff\xfe", "is not UTF-8"),
    ("a key longer than the file", b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") +
     (1).to_bytes(8, "little") + (2 ** 40).to_bytes(8, "little"), "truncated GGUF header"),
    ("more keys than bytes", b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") +
     (2 ** 50).to_bytes(8, "little"), "claims 0 tensors and 1125899906842624 metadata keys"),
])
def test_a_gguf_reader_refuses_each_damage_in_one_line(case, content, fragment, tmp_path):
    path = tmp_path / "m.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        checkpoints.read_gguf(path)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- config and header readers: by allow-list ---------------------------------------------------------------

HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
      "num_attention_heads": 8, "num_hidden_layers": 5, "num_key_value_heads": 4, "vocab_size": 512,
      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True,
      "hidden_act": "silu", "torch_dtype": "float32", "transformers_version": "5.25.0", "use_cache": True}
META = {"dim": 64, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512, "multiple_of": 32,
        "norm_eps": 1e-5, "max_seq_len": 512, "max_batch_size": 32}


@pytest.mark.parametrize("change,fragment", [
    ({"sliding_window": 4096}, "unknown field 'sliding_window'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "unknown field 'quantization_config'"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"num_hidden_layers": 5.0}, "num_hidden_layers must be a positive integer, got 5.0"),
    ({"vocab_size": True}, "vocab_size must be a positive integer, got True"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a number in (0, 1]"),
    ({"rope_theta": float("inf")}, "rope_theta must be a positive number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"attention_dropout": 0.1}, "attention_dropout = 0.1 is not implemented"),
    ({"model_type": "mistral"}, "model_type = 'mistral' is not implemented"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "rope_parameters must be"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}, "disagree"),
])
def test_a_hugging_face_config_is_read_by_allow_list(change, fragment):
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.hf_args({**HF, **change}, "config.json")
    assert fragment in str(e.value), str(e.value)


def test_a_transformers_5_config_gives_its_rope_theta_and_metadata_changes_nothing():
    base = checkpoints.hf_args(HF, "config.json")
    v5 = {k: v for k, v in HF.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    assert checkpoints.hf_args(v5, "config.json").rope_theta == 100000.0
    noisy = {**HF, "bos_token_id": 0, "pad_token_id": None, "dtype": "bfloat16", "_name_or_path": "x"}
    assert checkpoints.hf_args(noisy, "config.json") == base


@pytest.mark.parametrize("change,fragment", [
    ({"use_scaled_rope": True}, "use_scaled_rope = True is not implemented"),
    ({"dim": 64.5}, "dim must be a positive integer"),
    ({"vocab_size": -2}, "vocab_size must be a positive integer or -1"),
    ({"rope_scaling": 8}, "unknown field 'rope_scaling'"),
    ({"norm_eps": "1e-5"}, "norm_eps must be a number in (0, 1]"),
])
def test_a_meta_params_json_is_read_by_allow_list(change, fragment):
    assert checkpoints.meta_args(META, "params.json").dim == 64
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.meta_args({**META, **change}, "params.json")
    assert fragment in str(e.value), str(e.value)


def test_a_llama2c_header_that_lies_but_keeps_the_byte_count_is_refused(data, tmp_path):
    """Halving n_heads, n_kv_heads and seq_len together keeps every array's size (kv width n_kv·dim/n_heads and
    the RoPE table seq_len·head_dim/2 are unchanged): only the file's own RoPE table shows the lie."""
    import struct
    blob = bytearray((data / "stories260K" / "stories260K.bin").read_bytes())
    dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("7i", blob[:28])
    blob[:28] = struct.pack("7i", dim, hidden, layers, heads // 2, kv // 2, vocab, seq // 2)
    (tmp_path / "lie.bin").write_bytes(bytes(blob))
    assert checkpoints.load_checkpoint(data / "stories260K" / "stories260K.bin").args.n_heads == heads
    with pytest.raises(checkpoints.CheckpointError, match="disagrees with the file's own RoPE table"):
        checkpoints.load_checkpoint(tmp_path / "lie.bin")


@pytest.mark.parametrize("case,fragment", [
    ("integer weight", "is torch.int64, expected a floating-point tensor"),
    ("adapter r as text", "adapter config r = '8' is not valid"),
    ("adapter A of another rank", "do not have the config's rank r = 8"),
    ("adapter B as integers", "B is torch.int32, expected a 2-D floating-point tensor"),
    ("adapter with NaN", "A has NaN or inf entries"),
])
def test_tensor_dtypes_and_adapter_fields_are_checked_by_meaning(case, fragment, stories):
    import copy
    import llama
    if case == "integer weight":
        sd = {k: v.clone() for k, v in stories.state_dict().items()}
        sd["norm.weight"] = sd["norm.weight"].long()
        with pytest.raises(checkpoints.CheckpointError, match=fragment):
            checkpoints.check_finite(sd, "x.pth")
        return
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=8)
    state = llama.lora_state(model)
    name = next(iter(state["lora"]))
    if case == "adapter r as text":
        state["config"]["r"] = "8"
    elif case == "adapter A of another rank":
        state["lora"][name]["A"] = state["lora"][name]["A"][:4]
    elif case == "adapter B as integers":
        state["lora"][name]["B"] = state["lora"][name]["B"].int()
    else:
        state["lora"][name]["A"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=fragment):
        checkpoints.load_lora(copy.deepcopy(stories), state)


@pytest.mark.formats
def test_a_config_written_by_the_installed_transformers_reads_with_its_own_theta(tmp_path):
    """transformers 5 writes θ inside rope_parameters (no top-level rope_theta): a reader that fell back to the
    default 10,000 would compute another model without a word; every field it writes is known here."""
    transformers = pytest.importorskip("transformers")
    c = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=8, num_key_value_heads=4,
                                 num_hidden_layers=2, vocab_size=512, rope_theta=100000.0)
    c.save_pretrained(tmp_path)
    args = checkpoints.hf_args(json.loads((tmp_path / "config.json").read_text()), "config.json")
    assert (args.rope_theta, args.n_kv_heads, args.hidden_dim) == (100000.0, 4, 172)
