"""Text datasets: read documents, pack them into fixed-length token rows, and list the vocabulary text.

Dataset specs accepted by :func:`iter_documents`:

* ``path/to/file.txt`` -- one document per block of lines separated by blank lines (each block is
  stripped; empty blocks are skipped);
* ``path/to/file.jsonl`` -- one JSON object per line with a string ``text`` field (blank lines are skipped);
* ``path/to/file.parquet`` -- the ``text`` column, read in row-group batches (null values are skipped);
* ``builtin:python-docs`` -- the documentation topics shipped with CPython (``pydoc_data.topics``),
  one document per topic in sorted topic order; needs no download;
* anything else -- a Hugging Face dataset name, streamed (``name``, ``name:config``, ``name@split``
  or ``name:config@split``; the split defaults to ``train``); needs ``pip install datasets``.

Packing rule (``pack_tokens``): each document is tokenized on its own, without special tokens; a
separator token is appended after every document (the tokenizer's end-of-sequence token if it has one,
else its separator token, else nothing); documents that produce no tokens are skipped entirely; all
documents are concatenated into one token stream, in dataset order, and that stream is cut into
consecutive rows of exactly ``ctx_len`` tokens (with ``bos_id``: rows of ``ctx_len - 1`` tokens, each
after a beginning-of-sequence token). Nothing is padded, so a row can start or end in the middle of a
document. Reading stops as
soon as ``n_sequences x ctx_len`` tokens are collected; the rest of the dataset is never read, and the
tokens left over from the last document read are dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.hub import LOCAL_DATASETS, require_hub

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_PYTHON_DOCS = "builtin:python-docs"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
ACCEPTED_FORMS = (
    "a .txt file (documents separated by blank lines), a .jsonl file (objects with a 'text' field), "
    "a .parquet file (a 'text' column), 'builtin:python-docs', or a Hugging Face dataset name "
    "('name', 'name:config', 'name@split')"
)
_MAX_BATCH_DOCS = 256
_MAX_BATCH_BYTES = 4_000_000
_PARQUET_BATCH_ROWS = 1024
PIECE_CHARS = 1 << 16  # documents longer than this are tokenized in pieces of at most this many characters


def describe_packing() -> str:
    """The packing rule, one paragraph for the README (the same words as the module docstring)."""
    doc = __doc__ or ""
    paragraph = doc[doc.index("Packing rule") :].strip()
    return " ".join(paragraph.split()).replace("``", "`")


# ---------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------


def iter_documents(spec: str) -> Iterator[str]:
    """Yield the documents (strings) of the dataset ``spec``, lazily; see the module docstring.

    The spec itself is checked at once (:func:`check_dataset`, and a Hugging Face dataset that cannot
    be opened): those raise :class:`UserError` from this call. Problems found while reading (a bad
    line, a missing column) raise :class:`UserError` during iteration.
    """
    kind = check_dataset(spec)
    if kind == "builtin":
        return _builtin_documents(spec)
    if kind == "file":
        return _file_documents(Path(spec).expanduser())
    return _hub_documents(spec)


def check_dataset(spec: str) -> str:
    """What ``spec`` names ("builtin", "file" or "hub"), checked without reading it: an unknown
    builtin, a missing file, or a Hugging Face dataset while the Hub cannot be reached raise
    :class:`UserError` at once."""
    if spec.startswith(BUILTIN_PREFIX):
        if spec != BUILTIN_PYTHON_DOCS:
            raise UserError(f"unknown builtin dataset {spec!r}; the only builtin is {BUILTIN_PYTHON_DOCS!r}")
        return "builtin"
    path = Path(spec).expanduser()
    if path.exists():
        return "file"
    if path.suffix.lower() in FILE_SUFFIXES:
        raise UserError(f"dataset file {spec!r} not found; check the path")
    parse_hub_spec(spec)
    require_hub(f"--dataset {spec}", LOCAL_DATASETS)
    return "hub"


def _builtin_documents(spec: str) -> Iterator[str]:
    from pydoc_data.topics import topics

    return (topics[key] for key in sorted(topics))


def _file_documents(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise UserError(f"dataset {str(path)!r} is not a file; use {ACCEPTED_FORMS}")
    readers = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"dataset file {str(path)!r} has an unsupported suffix; use {ACCEPTED_FORMS}")
    return reader(path)


def _open_text(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 text file; a decoding error becomes a UserError."""
    try:
        with path.open(encoding="utf-8") as handle:
            yield from handle
    except UnicodeDecodeError as exc:
        raise UserError(f"dataset file {str(path)!r} is not UTF-8 text ({exc.reason}); re-encode it as UTF-8") from exc


def _txt_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    for line in _open_text(path):
        if line.strip():
            block.append(line)
            continue
        if block:
            yield "".join(block).strip()
            block = []
    if block:
        yield "".join(block).strip()


def _jsonl_documents(path: Path) -> Iterator[str]:
    for number, line in enumerate(_open_text(path), start=1):
        if line.strip():
            yield _jsonl_text(path, number, line)


def _jsonl_text(path: Path, number: int, line: str) -> str:
    where = f"{str(path)!r} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"dataset file {where} is not valid JSON ({exc.msg}); write one JSON object per line") from exc
    if not isinstance(record, dict) or "text" not in record:
        raise UserError(f"dataset file {where} has no 'text' field; every line must be an object with a 'text' string")
    text = record["text"]
    if not isinstance(text, str):
        kind = type(text).__name__
        raise UserError(f"dataset file {where}: 'text' is {kind}, not a string; store the text as a string")
    if "\\u" in line:  # a \uXXXX escape can encode half of a surrogate pair, which is not text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UserError(f"dataset file {where}: 'text' holds a lone surrogate ({text[exc.start]!r}), "
                            "which is not valid Unicode; fix or drop that line") from exc
    return text


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise UserError(f"dataset file {str(path)!r} is not a readable parquet file ({_reason(exc)})") from exc
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise UserError(f"dataset file {str(path)!r} has no 'text' column (columns: {', '.join(names)}); add one")
    for batch in _parquet_batches(path, parquet):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                kind = type(text).__name__
                raise UserError(f"dataset file {str(path)!r}: the 'text' column holds {kind}; it must hold strings")
            yield text


def _parquet_batches(path: Path, parquet) -> Iterator[Any]:
    """The 'text' column in row-group batches; damaged data pages become a UserError."""
    import pyarrow as pa

    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"dataset file {str(path)!r}: its data cannot be read ({_reason(exc)}); "
                            "the file is damaged: write it again") from exc
        yield batch


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``name[:config][@split]`` into (name, config or None, split; default ``train``)."""
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    if not name or (":" in rest and not config) or ("@" in spec and not split):
        raise UserError(f"cannot parse dataset {spec!r}; use {ACCEPTED_FORMS}")
    return name, config or None, split or "train"


def _hub_documents(spec: str) -> Iterator[str]:
    name, config, split = parse_hub_spec(spec)
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise UserError(
            f"dataset {spec!r} is not a local file, and reading Hugging Face datasets needs the "
            "'datasets' package; run `pip install datasets` or pass a .txt/.jsonl/.parquet file"
        ) from exc
    logger.info("streaming Hugging Face dataset %s (config %s, split %s)", name, config, split)
    try:
        stream = hf_datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # network, unknown name, bad config/split: all user-fixable
        raise UserError(_hub_error(spec, exc)) from exc
    return _hub_texts(spec, stream)


def _hub_texts(spec: str, stream: Iterable[dict[str, Any]]) -> Iterator[str]:
    iterator = iter(stream)
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise UserError(_hub_error(spec, exc)) from exc
        if "text" not in record:
            raise UserError(
                f"Hugging Face dataset {spec!r} has no 'text' field (fields: {', '.join(record)}); "
                "use a dataset with a 'text' column"
            )
        if record["text"] is not None:
            yield record["text"]


def _hub_error(spec: str, exc: BaseException) -> str:
    return (
        f"could not read Hugging Face dataset {spec!r} ({_reason(exc)}); check the name, config "
        "and split and your network connection, or pass a local .txt/.jsonl/.parquet file"
    )


def _reason(exc: BaseException) -> str:
    """A short one-line reason for an exception."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------------
# Packing tokens
# ---------------------------------------------------------------------------------------------------


def separator_token_id(tokenizer: Any) -> int | None:
    """The token appended after every document: eos if the tokenizer has one, else sep, else None."""
    for attribute in ("eos_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, attribute, None)
        if token_id is not None:
            return int(token_id)
    return None


def pack_tokens(
    docs: Iterable[str],
    tokenizer: Any,
    n_sequences: int,
    ctx_len: int,
    *,
    dataset_name: str | None = None,
    bos_id: int | None = None,
    piece_chars: int = PIECE_CHARS,
) -> np.ndarray:
    """Pack documents into an int32 array ``[n_sequences, ctx_len]`` by the rule in the module docstring.
    With ``bos_id`` each row is that token followed by the next ``ctx_len - 1`` tokens of the stream.

    A document longer than ``piece_chars`` characters is tokenized in pieces (``document_pieces``), so
    memory stays flat in document size and only the pieces the rows need are tokenized.
    ``dataset_name`` (e.g. the spec) only appears in messages. Raises :class:`UserError` if the documents hold no
    text or fewer than ``n_sequences * ctx_len`` tokens.
    """
    _check_positive("--n-sequences", n_sequences)
    _check_positive("--ctx-len", ctx_len)
    if bos_id is not None:
        if ctx_len < 2:
            raise UserError(f"--ctx-len {ctx_len}: with --prepend-bos a row needs at least 2 tokens")
        rows = pack_tokens(docs, tokenizer, n_sequences, ctx_len - 1, dataset_name=dataset_name,
                           piece_chars=piece_chars)
        return np.concatenate([np.full((n_sequences, 1), bos_id, dtype=np.int32), rows], axis=1)
    needed = n_sequences * ctx_len
    separator = separator_token_id(tokenizer)
    out = np.empty(needed, dtype=np.int32)
    filled = 0
    documents = iter(docs)
    while filled < needed:
        batch = _take_batch(documents, needed - filled, piece_chars)
        if not batch:
            break
        small: list[str] = []
        for doc in batch + [None]:
            if doc is not None and len(doc) <= piece_chars:
                small.append(doc)
                continue
            for ids in _tokenize(tokenizer, small) if small else ():
                filled = _append(out, filled, ids, separator)
            small = []
            if doc is not None:  # a big document: in pieces, only as far as the rows need
                filled = _append_pieces(out, filled, doc, tokenizer, separator, piece_chars)
    if filled < needed:
        raise UserError(_too_few_tokens(dataset_name, filled, n_sequences, ctx_len))
    logger.info("packed %d x %d tokens from %s", n_sequences, ctx_len, _label(dataset_name))
    return out.reshape(n_sequences, ctx_len)


def _check_positive(option: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{option} must be a positive integer, got {value!r}")


def _token_bound(doc: str) -> int:
    """An upper bound on the tokens a document adds to the stream: UTF-8 bytes, + prefix, + separator."""
    return len(doc.encode("utf-8", errors="replace")) + 2


def _take_batch(documents: Iterator[str], remaining: int, piece_chars: int = PIECE_CHARS) -> list[str]:
    """The next documents to tokenize together, never more than are needed to reach ``remaining`` tokens.

    A document is only taken while the batch so far cannot hold ``remaining`` tokens (by the byte bound),
    so no document is read that the packing would not use.
    """
    batch: list[str] = []
    bound = 0
    while bound < remaining and len(batch) < _MAX_BATCH_DOCS and bound < _MAX_BATCH_BYTES:
        doc = next(documents, None)
        if doc is None:
            break
        if not isinstance(doc, str):
            raise UserError(f"documents must be strings, got {type(doc).__name__}")
        batch.append(doc)
        bound += _token_bound(doc) if len(doc) <= piece_chars else _MAX_BATCH_BYTES  # a big one ends the batch
    return batch


def _tokenize(tokenizer: Any, batch: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens and without the too-long-sequence warning."""
    encoded = tokenizer(
        batch,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # documents may be longer than the model; we cut them ourselves
    )
    return encoded["input_ids"]


def document_pieces(doc: str, piece_chars: int = PIECE_CHARS, strip_space: bool = False) -> Iterator[str]:
    """`doc` in consecutive pieces of at most `piece_chars` characters. Each piece after the first
    starts at a single space between two non-space characters, where byte-level BPE (GPT-2, Llama 3)
    and WordPiece start a new word anyway, so the pieces' tokens join into the document's; a stretch
    of `piece_chars` with no such space is cut where it ends. `strip_space` drops that space from the
    piece (for tokenizers that prepend one to every text, e.g. SentencePiece's Metaspace)."""
    start, n = 0, len(doc)
    while n - start > piece_chars:
        stop = start + piece_chars  # < n
        cut = doc.rfind(" ", start + 1, stop + 1)
        while cut > start and (doc[cut - 1].isspace() or cut + 1 >= n or doc[cut + 1].isspace()):
            cut = doc.rfind(" ", start + 1, cut)
        if cut <= start:  # no word boundary in reach: a hard cut
            yield doc[start:stop]
            start = stop
            continue
        yield doc[start:cut]
        start = cut + 1 if strip_space else cut
    yield doc[start:]


_PROBE = "The quick brown fox, it's said, jumps over 12 lazy dogs.\nDon't   stop: x = f(a, b) + 3.5e-2 here."


def piece_mode(tokenizer: Any) -> bool | None:
    """How this tokenizer's pieces join into the whole document's tokens: False (a piece keeps its
    leading space), True (it drops it: the tokenizer prepends one itself), or None (neither, on a
    probe text cut at every place `document_pieces` may cut; pieces then keep the space)."""
    cached = getattr(tokenizer, "_ne_piece_mode", "unknown")
    if cached != "unknown":
        return cached
    whole = _tokenize(tokenizer, [_PROBE])[0]
    cuts = [i for i in range(1, len(_PROBE) - 1)
            if _PROBE[i] == " " and not _PROBE[i - 1].isspace() and not _PROBE[i + 1].isspace()]
    mode = None
    for strip in (False, True):
        parts = [[_PROBE[:c], _PROBE[c + strip:]] for c in cuts]
        encoded = _tokenize(tokenizer, [p for pair in parts for p in pair])
        if all(encoded[2 * i] + encoded[2 * i + 1] == whole for i in range(len(cuts))):
            mode = strip
            break
    if mode is None:
        logger.warning("this tokenizer splits text differently at word boundaries: documents longer than %d "
                       "characters may get other tokens where they are cut into pieces", PIECE_CHARS)
    try:
        tokenizer._ne_piece_mode = mode
    except AttributeError:
        pass
    return mode


def _append_pieces(out: np.ndarray, filled: int, doc: str, tokenizer: Any, separator: int | None,
                   piece_chars: int) -> int:
    """Tokenize a big document piece by piece into ``out`` until it is full, then its separator
    (none if the document gave no tokens, as for a whole document); new fill."""
    produced = False
    for piece in document_pieces(doc, piece_chars, bool(piece_mode(tokenizer))):
        if filled >= len(out):
            return filled
        ids = _tokenize(tokenizer, [piece])[0]
        produced = produced or bool(ids)
        filled = _append(out, filled, ids, None)
    if produced and separator is not None and filled < len(out):
        out[filled] = separator
        filled += 1
    return filled


def _append(out: np.ndarray, filled: int, ids: list[int], separator: int | None) -> int:
    """Copy one document's ids, then the separator, into ``out`` (as far as it has room); new fill."""
    if not ids:
        return filled
    chunk = list(ids) if separator is None else [*ids, separator]
    chunk = chunk[: len(out) - filled]
    out[filled : filled + len(chunk)] = chunk
    return filled + len(chunk)


def _label(dataset_name: str | None) -> str:
    return "the dataset" if dataset_name is None else f"dataset {dataset_name!r}"


def _too_few_tokens(dataset_name: str | None, found: int, n_sequences: int, ctx_len: int) -> str:
    if found == 0:
        return f"{_label(dataset_name)} has no text; use a dataset with non-empty documents"
    return (
        f"{_label(dataset_name)} has only {found} tokens, but --n-sequences {n_sequences} x "
        f"--ctx-len {ctx_len} needs {n_sequences * ctx_len}; lower --n-sequences or --ctx-len, "
        "or use a bigger dataset"
    )


# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------


def vocab_strings(tokenizer: Any) -> list[str]:
    """The text of every token id ``0 .. len(tokenizer) - 1``.

    Each entry is what ``tokenizer.decode([i])`` gives without clean-up of spaces, except that added and
    special tokens are always their literal text (``decode`` can garble non-ASCII added tokens with a
    byte-level decoder). For byte-level BPE, a token holding part of a multi-byte character decodes to
    U+FFFD, and joining the strings of an ASCII text's ids gives back the text. WordPiece continuation
    tokens keep their ``##`` prefix, as ``decode`` does.
    """
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {int(i): str(getattr(t, "content", t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    return [added[i] if i in added else _token_text(tokenizer, token) for i, token in enumerate(tokens)]


def _token_text(tokenizer: Any, token: str | None) -> str:
    if token is None:
        return ""
    return tokenizer.convert_tokens_to_string([token])
