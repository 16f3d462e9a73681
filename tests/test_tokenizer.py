import functools
import json
import warnings

import pytest

from conftest import SHARED
from llmctl.errors import LlmctlError
from llmctl.tokenizer import EOS, PAD, UNK, StreamDecoder, Tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def test_char_round_trip_and_specials():
    tok = Tokenizer.train_char([TEXT])
    assert (tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == len(set(TEXT)) + 3
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and tok.decode(ids) == TEXT
    # special tokens written in text become the special ids; unseen characters become <unk>
    ids = tok.encode("hear<eos>Zé")
    assert ids[4] == tok.eos_id and ids[-1] == tok.unk_id and ids[-2] == tok.unk_id
    assert tok.decode(ids) == "hear"
    assert tok.decode(ids, skip_special=False) == f"hear{EOS}{UNK}{UNK}"
    assert tok.kind == "char"


def test_bpe_round_trip_and_specials():
    text = TEXT * 20 + "naïve café — ünïcödé ☃\n"
    tok = Tokenizer.train_bpe([text], 300)
    assert tok.vocab_size == 300
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    assert tok.encode(EOS) == [tok.eos_id]
    assert tok.decode(tok.encode("never seen: 漢字")) == "never seen: 漢字"  # bytes cover everything
    assert tok.kind == "bpe"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streaming_decode_equals_full_decode(kind):
    text = TEXT * 10 + "ünïcödé ☃ 漢字\n"
    tok = Tokenizer.train_char([text]) if kind == "char" else Tokenizer.train_bpe([text], 280)
    ids = tok.encode(text)
    pieces = list(tok.stream(iter(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_save_load_identical(tmp_path):
    tok = Tokenizer.train_char([TEXT])
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.sha256 == tok.sha256


def test_identity_is_what_the_tokenizer_is_not_how_it_was_written(tmp_path):
    """Tokenizer.sha256, the one rule of "the same tokenizer" (caches, teacher and student, policy and reference):
    exported and imported again (its specials now named by tokenizer_config.json), or given those names in its
    settings, it is the same tokenizer; another end-of-text token, another end id or another vocabulary is not."""
    from llmctl import tokenizer_files

    tok = Tokenizer.train_char([TEXT])
    tokenizer_files.write(tmp_path, tok, 32, None)
    again, _ = tokenizer_files.read(tmp_path, Tokenizer.from_file(tmp_path / "tokenizer.json"), {})
    assert tok.named is None and again.named == {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    assert again.sha256 == tok.sha256
    relaid = json.dumps(json.loads(tok.to_str()), indent=2, sort_keys=True)  # another layout and key order
    assert relaid != tok.to_str() and Tokenizer.from_str(relaid).sha256 == tok.sha256
    assert Tokenizer(tok.tk, {"eos_token": PAD}).sha256 != tok.sha256  # another end-of-text token
    assert Tokenizer(tok.tk, None, [3]).sha256 != tok.sha256  # generation also ends at id 3
    assert Tokenizer.train_char([TEXT + "Q"]).sha256 != tok.sha256  # one more token


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(LlmctlError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LlmctlError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_unseen_characters_are_reported_with_counts_and_texts():
    tok = Tokenizer.train_char([TEXT])
    assert not tok.unseen(TEXT) and not tok.unseen("")
    found = tok.unseen("hear 🙂🙂 Zé <unk>")  # <unk> spelled out is the special token, not an unseen character
    assert found.count == 4 and list(found.pieces) == ["🙂", "Z", "é"] and found.pieces["🙂"] == 2
    msg = found.message("the prompt")
    assert msg.startswith("the prompt: 4 characters the tokenizer never saw in training became <unk>")
    assert "3 distinct: '🙂', 'Z', 'é'" in msg and "\n" not in msg
    many = tok.unseen(["hear", "Z", "me", "🙂 ☃ 漢 字 ü ö"])
    assert many.texts == [1, 3] and many.count == 7
    assert "and 2 more" in many.message("--input")  # five named, the rest counted
    one = tok.unseen("Z").message("x")
    assert "1 character the tokenizer" in one and "distinct" not in one
    long = TEXT * 5000 + "Zx\n" + TEXT  # a long text is looked at in pieces, with the same result
    assert list(tok.unseen(long).pieces) == ["Z", "x"] and tok.unseen(long).count == 2


def test_byte_level_bpe_has_no_unseen_characters():
    tok = Tokenizer.train_bpe([TEXT * 20], 300)
    assert tok.unk_id is None and not tok.unseen("漢字 🙂")


# ------------------------------------------------------------------------------------------------------------------
# The real tokenizers of open models (../shared/data/tokenizers), against transformers' tokenizer of the same files

REAL = SHARED / "tokenizers"
REAL_NAMES = sorted(p.parent.name for p in REAL.glob("*/tokenizer.json"))
PARAGRAPH = ("Hello, world! Grüße aus Köln — naïve café.\n你好，世界！日本語のテキストです。한국어 문장.\n"
             "Emoji: 🙂👍🏽🇫🇷 and 🧑‍💻 (ZWJ).\n```python\ndef f(x):\n    return x ** 2  # squares\n```\n"
             "  two leading spaces,\ttabs,  double  spaces and a trailing one ")
# transformers 5 rebuilds these families' pipeline (its LlamaTokenizer class, legacy=False) instead of reading
# tokenizer.json as it is; llmctl uses tokenizer.json as it is (as transformers 4 did, and PreTrainedTokenizerFast does)
REBUILT_BY_AUTOTOKENIZER = {"phi3"}


@functools.lru_cache(maxsize=None)
def real(name: str):
    """(ours: the tokenizer with the settings import reads, transformers' tokenizer of the same files)."""
    transformers = pytest.importorskip("transformers")
    from llmctl import tokenizer_files

    d = REAL / name
    ours, _ = tokenizer_files.read(d, Tokenizer.from_file(d / "tokenizer.json"), {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in REBUILT_BY_AUTOTOKENIZER:
            named = tokenizer_files.special_tokens(d, json.loads((d / "tokenizer_config.json").read_text()))
            theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), **named)
        else:
            theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    return ours, theirs


def test_the_real_tokenizers_are_there():
    if not REAL.is_dir():
        pytest.skip(f"no shared tokenizers at {REAL}")
    assert REAL_NAMES == ["gemma2", "llama2", "llama3", "mistral", "mistral-nemo", "phi3", "qwen2", "qwen3"]


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_tokenizers_encode_and_decode_as_transformers(name):
    ours, theirs = real(name)
    specials = [t for t in (theirs.eos_token, theirs.bos_token, "<|im_end|>", "<s>") if t]
    text = PARAGRAPH + " " + " and ".join(specials) + " inside the text."  # special tokens spelled in the text
    ids = ours.encode_prompt(text)
    assert ids == theirs(text)["input_ids"]  # with the special tokens the post-processor adds
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids, skip_special=False) == theirs.decode(ids)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    if theirs.eos_token is not None:
        assert ours.eos_id == theirs.eos_token_id and ours.eos_token == theirs.eos_token
    assert ours.bos_id == theirs.bos_token_id or theirs.bos_token is None


@pytest.mark.parametrize("name", REAL_NAMES)
@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_real_tokenizers_stream_decode_as_transformers_decodes(name, skip):
    ours, theirs = real(name)
    eos = ours.eos_id
    ids = ours.encode_prompt(PARAGRAPH) + [eos] + ours.encode(" after the end, 🙂") + [eos, eos] + ours.encode("x")
    full = theirs.decode(ids, skip_special_tokens=skip)
    dec = StreamDecoder(ours, skip)
    emitted = ""
    for i in ids:
        emitted += dec.push(i)
        # at every step a beginning of the whole text: no broken character, no space a later token would take back
        # (decoding a prefix is not that: byte-fallback bytes of a character still incomplete garble the whole run)
        assert full.startswith(emitted)
    emitted += dec.flush()
    assert emitted == full
    assert "".join(ours.stream(ids, skip)) == emitted
