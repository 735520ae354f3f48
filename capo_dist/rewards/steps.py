"""Steps of a response and the exact token → step map (DESIGN §1.1).

A response is split into steps on blank lines; every generated token belongs
to the step containing its first character. The token's characters come from
exact char offsets of the GENERATED token ids in the decoded text (never a
re-tokenisation of the text and never a guess by token counts):
`token_char_offsets` → `token_steps`.
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

# A blank-line separator: a newline, then any whitespace (including more blank
# lines), then a newline — so a run of blank lines counts once.
_SEPARATOR_RE = re.compile(r"\n\s*\n")


def split_steps(text: str) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of the steps of `text`, in order (step 0 first).

    Steps are separated by blank lines (`\\n\\n`; runs of blank lines, and lines
    holding only spaces, count once). Each span is trimmed of surrounding
    whitespace, so `text[start:end]` is the step's text without the separating
    blank lines; whitespace-only chunks are dropped. A text with no
    non-whitespace character has no steps (`[]`).
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in _SEPARATOR_RE.finditer(text):
        _add_trimmed(text, pos, m.start(), spans)
        pos = m.end()
    _add_trimmed(text, pos, len(text), spans)
    return spans


def _add_trimmed(text: str, start: int, end: int, out: list[tuple[int, int]]) -> None:
    chunk = text[start:end]
    stripped = chunk.lstrip()
    if not stripped:
        return
    s = start + (len(chunk) - len(stripped))
    e = start + len(chunk.rstrip())
    out.append((s, e))


# ---------------------------------------------------------------------------
# token → char offsets


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (printable char → byte)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder is (or contains) the byte-level decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return False
    try:
        decoder = json.loads(backend.decoder.__getstate__())
    except Exception:
        return False
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)


def token_char_offsets(
    tokenizer: Any, token_ids: Sequence[int], *, skip_special_tokens: bool = True
) -> list[tuple[int, int]]:
    """Exact char span of each token id in `tokenizer.decode(token_ids, skip_special_tokens=...)`.

    The ids are the GENERATED ones (not necessarily the canonical tokenization
    of the text), so the text is never re-encoded. Two methods:

    * byte-level BPE (GPT-2/Llama-3/Qwen style decoders): each token is mapped
      to its bytes through the byte-level alphabet; byte positions become char
      positions by counting UTF-8 lead bytes. A token that starts inside a
      multi-byte character belongs to that character (its span starts there).
      Invalid UTF-8 (a character cut by max_tokens, stray bytes) is mapped as
      the lossy decode does: one U+FFFD per maximal invalid byte sequence.
      Used when the rebuilt text equals `tokenizer.decode(...)` exactly.
    * otherwise (other decoders, added non-special tokens), the
      generic cumulative decode: token k ends where the decode of the first k
      tokens stops agreeing with the full text. Exact whenever decoding is
      prefix-stable (true for byte-level and SentencePiece/byte-fallback
      decoders); O(T) decode calls.

    Skipped special tokens (e.g. EOS) get an empty span at their position, so
    a trailing EOS gets `(len(text), len(text))`.
    """
    ids = list(map(int, token_ids))
    if not ids:
        return []
    text = _decode(tokenizer, ids, skip_special_tokens)
    table = _byte_table(tokenizer)
    if table.byte_level:
        offsets = _byte_level_offsets(table, ids, text, skip_special_tokens)
        if offsets is not None:
            return offsets
    return _cumulative_offsets(tokenizer, ids, text, skip_special_tokens)


class _ByteTable:
    """What a tokenizer's offsets need, computed once: whether it is byte-level
    and, if so, the map id → the token's bytes (None: not a plain byte-level
    token, e.g. an added non-special token) with specials skipped and kept."""

    def __init__(self, tokenizer: Any) -> None:
        self.size = size = _vocab_size(tokenizer)
        self.byte_level = _is_byte_level(tokenizer)
        self.skip: list[bytes | None] = []
        self.keep: list[bytes | None] = []
        if not self.byte_level:
            return
        decoder = _byte_decoder()
        special = set(getattr(tokenizer, "all_special_ids", ()))
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.skip = [None] * size
        self.keep = [None] * size
        for tid, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
            if tid in special:
                self.skip[tid], self.keep[tid] = b"", str(tok).encode("utf-8")
            elif tid not in added and tok is not None:
                try:
                    self.skip[tid] = self.keep[tid] = bytes(decoder[c] for c in tok)
                except KeyError:
                    pass


_BYTE_TABLES: weakref.WeakKeyDictionary[Any, _ByteTable] = weakref.WeakKeyDictionary()


def _byte_table(tokenizer: Any) -> _ByteTable:
    """The tokenizer's `_ByteTable`, built once per tokenizer (and vocab size)."""
    try:
        table = _BYTE_TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable/hashable: no cache
        return _ByteTable(tokenizer)
    if table is None or table.size != _vocab_size(tokenizer):
        table = _ByteTable(tokenizer)
        _BYTE_TABLES[tokenizer] = table
    return table


def _vocab_size(tokenizer: Any) -> int:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return int(backend.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def _decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> str:
    """`tokenizer.decode(ids, skip_special_tokens=...)`, through the Rust backend
    directly when that is the same thing (no clean-up of tokenization spaces):
    the Python wrapper's per-id checks cost more than the decode itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _byte_level_offsets(
    table: _ByteTable, ids: list[int], text: str, skip_special_tokens: bool
) -> list[tuple[int, int]] | None:
    lookup = table.skip if skip_special_tokens else table.keep
    if min(ids) < 0 or max(ids) >= table.size:
        return None
    pieces = [lookup[i] for i in ids]
    if None in pieces:
        return None  # added non-special tokens decode verbatim: use the generic path
    data = b"".join(pieces)
    if data.decode("utf-8", errors="replace") != text:
        return None
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    byte_end = np.cumsum(lens)
    byte_start = byte_end - lens
    buf = np.frombuffer(data, dtype=np.uint8)
    # A character starts at every UTF-8 lead byte; an invalid byte sequence
    # (e.g. a character cut by max_tokens) decodes to ONE U+FFFD starting at
    # its first byte, exactly as the tokenizer's lossy decode does.
    is_start = (buf & 0xC0) != 0x80
    for a, b in _invalid_utf8_ranges(data):
        is_start[a] = True
        is_start[a + 1 : b] = False
    # chars_before[b] = number of characters that start in bytes [0, b).
    chars_before = np.zeros(len(buf) + 1, dtype=np.int64)
    np.cumsum(is_start, out=chars_before[1:])
    if chars_before[-1] != len(text):
        return None
    # Non-empty token: from the char containing its first byte to the end of
    # the char containing its last byte. Empty token: an empty span where it sits.
    nonempty = lens > 0
    first = np.where(nonempty, chars_before[np.minimum(byte_start + 1, len(buf))] - 1, 0)
    start = np.where(nonempty, first, chars_before[byte_start])
    end = chars_before[byte_end]
    return list(zip(start.tolist(), end.tolist(), strict=True))


_UTF8_WINDOW = 256  # > 4 bytes (the longest character), so every window makes progress


def _invalid_utf8_ranges(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges that UTF-8 decoding replaces by U+FFFD (one char each).

    Decoded in windows of _UTF8_WINDOW bytes (a character cut at a window's end
    is decoded with the next window): a decode error holds a copy of what was
    decoded, so decoding the whole rest after each error was quadratic in the
    number of stray bytes. Linear in `len(data)`.
    """
    ranges: list[tuple[int, int]] = []
    view = memoryview(data)
    pos, size = 0, len(data)
    while pos < size:
        end = min(pos + _UTF8_WINDOW, size)
        try:
            _, used = codecs.utf_8_decode(view[pos:end], "strict", end == size)
            pos += used
        except UnicodeDecodeError as e:
            ranges.append((pos + e.start, pos + e.end))
            pos += e.end
    return ranges


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # binary search on the longest common prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cumulative_offsets(
    tokenizer: Any, ids: list[int], text: str, skip_special_tokens: bool
) -> list[tuple[int, int]]:
    offsets: list[tuple[int, int]] = []
    prev = 0
    for k in range(1, len(ids) + 1):
        prefix = _decode(tokenizer, ids[:k], skip_special_tokens)
        end = max(prev, _common_prefix_len(prefix, text))
        offsets.append((prev, end))
        prev = end
    return offsets


# ---------------------------------------------------------------------------
# token → step


def token_steps(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """The step of each token: the step containing the token's first character.

    Tokens starting in the whitespace between two steps belong to the
    preceding step; tokens before the first step go to step 0; tokens after
    the last step (trailing whitespace, EOS with its empty span at the end)
    go to the last step. A response with no steps (`spans == []`) maps every
    token to step 0 and has `num_steps == 0`: its step-weight vector is empty
    and the reward functions give it no process penalty.
    O(T log S) (binary search of token starts in step starts).
    """
    if not offsets:
        return []
    if not spans:
        return [0] * len(offsets)
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    tok_start = np.array([s for s, _ in offsets], dtype=np.int64)
    steps = np.searchsorted(starts, tok_start, side="right") - 1
    return np.minimum(np.maximum(steps, 0), len(spans) - 1).tolist()
