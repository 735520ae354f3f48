"""Steps (DESIGN §1.1): blank-line split, exact token char offsets, token → step."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.rewards.steps import (
    _cumulative_offsets,
    split_steps,
    token_char_offsets,
    token_steps,
)

# --------------------------------------------------------------------------- split_steps


def test_split_steps_basic_and_exact_spans():
    text = "First step.\n\nSecond step\nstill second.\n\n\n\nThird."
    spans = split_steps(text)
    assert [text[s:e] for s, e in spans] == [
        "First step.",
        "Second step\nstill second.",
        "Third.",
    ]


def test_split_steps_runs_of_blank_lines_and_whitespace_only_chunks():
    text = "\n\n  \n a \n \n\n\t\n b\n\n   \n\n"
    assert [text[s:e] for s, e in split_steps(text)] == ["a", "b"]


def test_split_steps_empty_and_blank():
    assert split_steps("") == []
    assert split_steps(" \n\n \t\n") == []
    assert split_steps("one line") == [(0, 8)]


def test_split_steps_single_newline_does_not_split():
    assert len(split_steps("a\nb\nc")) == 1


_chunk = st.text(alphabet="ab \tx=1é中🙂.", min_size=0, max_size=8)
_sep = st.sampled_from(["\n", "\n\n", "\n \n", "\n\n\n\n", " ", "\n\t\n\n"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_chunk, _sep), max_size=12))
def test_split_steps_matches_naive_definition(parts):
    text = "".join(c + s for c, s in parts)
    spans = split_steps(text)
    # Naive reference: split on "\n<whitespace>\n", strip, drop empty.
    expected = [c.strip() for c in re.split(r"\n\s*\n", text) if c.strip()]
    assert [text[s:e] for s, e in spans] == expected
    # Spans are ordered, disjoint, non-empty and trimmed.
    for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False):
        assert e0 < s1
        assert re.search(r"\n\s*\n", text[e0:s1])
    for s, e in spans:
        assert s < e and not text[s].isspace() and not text[e - 1].isspace()


# --------------------------------------------------------------------------- tokenizer

CORPUS = [
    "Step one: compute 3 + 4 = 7.\n\nStep two: the café costs 5 €.\n\n\n\nSo the answer is 7.",
    "中文 数学 问题。 答案 是 42。\n\n下一步 🙂 🎉 done.\n\nThe answer is \\boxed{42}.",
    "Let x = 2. Then x^2 = 4.\n\n  \n\nHence $x^2 + 1 = 5$.\n\nWrong step list: [1, 3]",
] * 30


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from capo_dist.models import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, 400, out)
    return AutoTokenizer.from_pretrained(str(out))


def _byte_oracle(tokenizer, ids):
    """Expected spans from bytes, by prefix decoding (lossy, like the tokenizer):
    start = index of the char containing the first byte, end = number of chars
    started before the end byte."""
    from capo_dist.rewards.steps import _byte_decoder

    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    pieces = [
        b"" if i in special else bytes(dec[c] for c in t)
        for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
    ]
    data = b"".join(pieces)
    out, pos = [], 0
    for p in pieces:
        end = len(data[: pos + len(p)].decode("utf-8", "replace"))
        if p:
            out.append((len(data[: pos + 1].decode("utf-8", "replace")) - 1, end))
        else:
            out.append((end, end))
        pos += len(p)
    return out


def test_offsets_canonical_tokenization(tokenizer):
    text = "Café 中文 🙂!\n\nNext step.\n\n\n\n  Last: 42."
    ids = tokenizer.encode(text, add_special_tokens=False)
    offs = token_char_offsets(tokenizer, ids)
    assert tokenizer.decode(ids) == text
    assert "".join(text[s:e] for s, e in offs) == text  # contiguous cover
    for tid, (s, e) in zip(ids, offs, strict=True):
        assert text[s:e] == tokenizer.decode([tid])


def test_offsets_empty():
    assert token_char_offsets(object(), []) == []


def test_offsets_eos_gets_empty_span_at_end(tokenizer):
    text = "One.\n\nTwo."
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    offs = token_char_offsets(tokenizer, ids)
    assert offs[-1] == (len(text), len(text))
    # With special tokens kept in the text, EOS spans its own text.
    offs_kept = token_char_offsets(tokenizer, ids, skip_special_tokens=False)
    kept = tokenizer.decode(ids, skip_special_tokens=False)
    s, e = offs_kept[-1]
    assert kept[s:e] == tokenizer.eos_token and e == len(kept)


def _single_byte_ids(tokenizer, text):
    """Generated (non-canonical) ids: one byte-level token per BYTE."""
    from capo_dist.rewards.steps import _byte_decoder

    enc = {b: c for c, b in _byte_decoder().items()}
    vocab = tokenizer.get_vocab()
    return [vocab[enc[b]] for b in text.encode("utf-8")]


def test_offsets_multibyte_char_split_over_tokens(tokenizer):
    text = "a🙂é中\n\nb"
    ids = _single_byte_ids(tokenizer, text)
    assert tokenizer.decode(ids) == text
    offs = token_char_offsets(tokenizer, ids)
    assert offs == _byte_oracle(tokenizer, ids)
    # the 4 bytes of 🙂 all belong to char 1; the 2 bytes of é to char 2.
    assert offs[1:5] == [(1, 2)] * 4
    assert offs[5:7] == [(2, 3)] * 2
    assert offs[7:10] == [(3, 4)] * 3


def test_offsets_random_generated_sequences_match_byte_oracle(tokenizer):
    """Non-canonical sequences: random mixtures of canonical pieces, per-char and
    per-byte tokens; offsets equal the byte oracle and the text is decode(ids)."""
    rng = random.Random(0)
    words = ["Café", "中文", "🙂", "🎉", " x", " = ", "42", "\n\n", "\n\n\n", "  ", " ", "é", "."]
    for _ in range(60):
        ids: list[int] = []
        for _ in range(rng.randint(1, 25)):
            w = rng.choice(words)
            how = rng.random()
            if how < 0.4:
                ids += tokenizer.encode(w, add_special_tokens=False)
            elif how < 0.7:
                for ch in w:
                    ids += tokenizer.encode(ch, add_special_tokens=False)
            else:
                ids += _single_byte_ids(tokenizer, w)
            if rng.random() < 0.05:  # a special token mid-sequence: empty span
                ids.append(tokenizer.bos_token_id)
        if rng.random() < 0.5:
            ids.append(tokenizer.eos_token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        offs = token_char_offsets(tokenizer, ids)
        assert offs == _byte_oracle(tokenizer, ids)
        assert all(0 <= s <= e <= len(text) for s, e in offs)
        assert max(e for _, e in offs) == len(text)
        assert [s for s, _ in offs] == sorted(s for s, _ in offs)


def test_offsets_invalid_utf8_cut_character(tokenizer):
    """A character cut by max_tokens (invalid UTF-8 at the end) is one U+FFFD."""
    ids = _single_byte_ids(tokenizer, "ok 中🙂")[:-2]
    text = tokenizer.decode(ids)
    assert text == "ok 中\ufffd"
    offs = token_char_offsets(tokenizer, ids)
    assert offs == _byte_oracle(tokenizer, ids)
    assert offs[-2:] == [(4, 5), (4, 5)]


def test_offsets_random_bytes_match_lossy_decode(tokenizer):
    """Arbitrary byte tokens (lots of invalid UTF-8) stay on the byte-level path."""
    from capo_dist.rewards import steps

    rng = random.Random(1)
    vocab = tokenizer.get_vocab()
    enc = {b: c for c, b in steps._byte_decoder().items()}
    for _ in range(100):
        raw = bytes(
            rng.choice([rng.randrange(256), *b"\xe4\xb8\xad\xf0\x9f a\n"]) for _ in range(30)
        )
        ids = [vocab[enc[b]] for b in raw]
        text = tokenizer.decode(ids)
        fast = steps._byte_level_offsets(steps._byte_table(tokenizer), ids, text, True)
        assert fast is not None
        assert fast == _byte_oracle(tokenizer, ids) == token_char_offsets(tokenizer, ids)
        assert fast[-1][1] == len(text)


def test_cumulative_fallback_equals_byte_level_on_whole_char_tokens(tokenizer):
    text = "Step 1: café 中文.\n\n \n\nStep 2: 🙂 x = 3."
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert _cumulative_offsets(tokenizer, ids, text, True) == token_char_offsets(tokenizer, ids)


def test_cumulative_fallback_on_cut_characters(tokenizer):
    """Byte tokens that cut a character: a prefix decodes to U+FFFD, which is not a prefix
    of the text, so the token's span ends where the decodes last agree (hand-computed)."""
    ids = _single_byte_ids(tokenizer, "中a中")  # 3 + 1 + 3 byte tokens
    text = tokenizer.decode(ids)
    assert text == "中a中"
    assert _cumulative_offsets(tokenizer, ids, text, True) == [
        (0, 0), (0, 0), (0, 1),  # 中 ends with its last byte; the first two are empty
        (1, 2),  # a
        (2, 2), (2, 2), (2, 3),
    ]  # fmt: skip


def test_offsets_generic_tokenizer(tmp_path):
    """A non-byte-level (Metaspace/SentencePiece-style) tokenizer uses the generic path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    text = "Step one: 3 + 4 = 7. So the answer is 7."
    ids = fast.encode(text, add_special_tokens=False) + [fast.eos_token_id]
    decoded = fast.decode(ids, skip_special_tokens=True)
    offs = token_char_offsets(fast, ids)
    assert "".join(decoded[s:e] for s, e in offs) == decoded
    assert offs[-1] == (len(decoded), len(decoded))


# --------------------------------------------------------------------------- token_steps


def test_token_steps_rules():
    #        0123456789012345
    text = "  ab\n\ncd  \n\n\nef  "
    spans = split_steps(text)
    assert spans == [(2, 4), (6, 8), (13, 15)]
    offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 13), (13, 15), (15, 17), (17, 17)]
    # leading ws → step 0; gap → preceding step; trailing ws and EOS → last step.
    assert token_steps(offsets, spans) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_token_steps_no_steps_and_no_tokens():
    assert token_steps([(0, 1), (1, 1)], []) == [0, 0]
    assert token_steps([], [(0, 3)]) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(1, 5)), min_size=1, max_size=10),
    st.lists(st.integers(0, 80), max_size=40),
)
def test_token_steps_matches_naive(raw_spans, starts):
    spans, pos = [], 0
    for gap, length in raw_spans:
        spans.append((pos + gap, pos + gap + length))
        pos += gap + length
    starts = sorted(starts)
    offsets = [(s, s + 1) for s in starts]

    def naive(c):
        for i in reversed(range(len(spans))):
            if spans[i][0] <= c:
                return i
        return 0

    assert token_steps(offsets, spans) == [naive(s) for s, _ in offsets]


def test_end_to_end_whitespace_tokens_between_steps(tokenizer):
    text = "Compute 2+2.\n\n\n\nIt is 4 🙂.\n\n  The answer is 4."
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    spans = split_steps(text)
    offs = token_char_offsets(tokenizer, ids)
    steps = token_steps(offs, spans)
    for (s, e), k in zip(offs, steps, strict=True):
        piece = text[s:e]
        if piece.strip():  # a token with visible text lies in its own step
            first = s + (len(piece) - len(piece.lstrip()))
            assert spans[k][0] <= first < spans[k][1] or piece[0].isspace()
        else:  # whitespace between steps (or EOS) → the preceding step
            prev = max(i for i, (a, _) in enumerate(spans) if a <= max(s, spans[0][0]))
            assert k == prev
    assert steps[-1] == len(spans) - 1


# --------------------------------------------------------------------------- byte-level table
# These read the table and the decoder check directly: `token_char_offsets` builds them once
# per tokenizer and caches them, so a test of offsets sees them only through whichever test
# ran first.


def _fast_tokenizer(decoder):
    """A tiny fast tokenizer whose Rust backend has `decoder` (None: no decoder)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if decoder is not None:
        tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_is_byte_level_reads_the_backend_decoder(tokenizer):
    from types import SimpleNamespace

    from tokenizers import decoders

    from capo_dist.rewards.steps import _is_byte_level

    assert _is_byte_level(tokenizer) is True  # a plain ByteLevel decoder
    seq = decoders.Sequence([decoders.Fuse(), decoders.ByteLevel()])  # ByteLevel inside
    assert _is_byte_level(_fast_tokenizer(seq)) is True
    assert _is_byte_level(_fast_tokenizer(decoders.Sequence([decoders.Metaspace()]))) is False
    assert _is_byte_level(_fast_tokenizer(decoders.Metaspace())) is False
    assert _is_byte_level(_fast_tokenizer(None)) is False  # no decoder
    assert _is_byte_level(object()) is False  # no Rust backend at all
    unreadable = SimpleNamespace(backend_tokenizer=SimpleNamespace(decoder=SimpleNamespace()))
    assert _is_byte_level(unreadable) is False  # a decoder state that is not JSON


def test_byte_table_maps_each_id_to_its_bytes(tokenizer):
    import copy

    from tokenizers import decoders

    from capo_dist.rewards.steps import _ByteTable

    table = _ByteTable(tokenizer)
    size = len(tokenizer)
    assert table.byte_level is True and table.size == size
    assert len(table.skip) == len(table.keep) == size
    special = set(tokenizer.all_special_ids)
    for tid in special:  # skipped specials decode to nothing; kept ones to their text
        assert table.skip[tid] == b""
        assert table.keep[tid] == tokenizer.convert_ids_to_tokens(tid).encode("utf-8")
    checked = 0
    for tid in set(range(size)) - special:
        raw = table.skip[tid]
        assert raw is not None and raw == table.keep[tid]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a lone byte of a longer character
            continue
        assert text == tokenizer.decode([tid]), tid
        checked += 1
    assert checked > size // 2
    # an added non-special token decodes verbatim: not a byte-level piece
    extra = copy.deepcopy(tokenizer)
    extra.add_tokens(["<step>"])
    table = _ByteTable(extra)
    new = extra.convert_tokens_to_ids("<step>")
    assert table.size == size + 1 and table.skip[new] is None and table.keep[new] is None
    assert table.skip[tokenizer.eos_token_id] == b""
    # not byte-level: no table
    plain = _ByteTable(_fast_tokenizer(decoders.Metaspace()))
    assert plain.byte_level is False and plain.skip == [] and plain.keep == []


def test_byte_level_offsets_guards_and_kept_specials(tokenizer):
    """Out-of-range ids leave the byte-level path (None); id 0 is an id like any other;
    with specials kept, their text is part of the decode and of the offsets."""
    from capo_dist.rewards.steps import _byte_level_offsets, _byte_table

    table = _byte_table(tokenizer)
    ids = tokenizer.encode("ab 1", add_special_tokens=False)
    text = tokenizer.decode(ids)
    offsets = _byte_level_offsets(table, ids, text, True)
    assert offsets == _byte_oracle(tokenizer, ids)
    assert offsets[-1][1] == len(text) == 4
    assert _byte_level_offsets(table, [*ids, table.size], text, True) is None
    assert _byte_level_offsets(table, [*ids, table.size - 1], text, True) is None  # not the text
    assert _byte_level_offsets(table, [-1, *ids], text, True) is None
    zero = [0, *ids]
    assert tokenizer.convert_ids_to_tokens(0) in tokenizer.all_special_tokens
    zero_text = tokenizer.decode(zero, skip_special_tokens=True)
    assert _byte_level_offsets(table, zero, zero_text, True) == [(0, 0), *offsets]
    kept = [*ids, tokenizer.eos_token_id]
    kept_text = tokenizer.decode(kept, skip_special_tokens=False)
    assert kept_text == text + tokenizer.eos_token
    assert _byte_level_offsets(table, kept, kept_text, False) == [*offsets, (4, len(kept_text))]


def test_byte_table_is_cached_per_tokenizer_until_its_vocab_grows(tokenizer):
    import copy

    from capo_dist.rewards.steps import _byte_table, _vocab_size

    tok = copy.deepcopy(tokenizer)
    first = _byte_table(tok)
    assert _byte_table(tok) is first
    size = _vocab_size(tok)
    assert size == len(tok) == first.size
    tok.add_tokens(["<step>"])
    assert _vocab_size(tok) == size + 1  # added tokens count
    grown = _byte_table(tok)
    assert grown is not first and grown.size == size + 1 and _byte_table(tok) is grown
    plain = _byte_table(["a", "b"])  # not weak-referenceable: built each time, not cached
    assert plain.size == 2 and plain.byte_level is False and _byte_table(["a", "b"]) is not plain


def test_decode_cleans_up_spaces_exactly_as_the_tokenizer_does(tokenizer):
    import copy

    from capo_dist.rewards.steps import _decode

    tok = copy.deepcopy(tokenizer)
    # transformers cleans up a BPE tokenizer's spaces only when told twice
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = [*tok.encode("a , b .", add_special_tokens=False), tok.eos_token_id]
    texts = set()
    for clean in (True, False):
        tok.clean_up_tokenization_spaces = clean
        text = _decode(tok, ids, True)
        assert text == tok.decode(ids, skip_special_tokens=True)
        texts.add(text)
    assert texts == {"a, b.", "a , b ."}


def test_wordpiece_tokenizer_takes_the_generic_path(tmp_path):
    """A WordPiece tokenizer (not byte-level) takes the generic path; its vocabulary size
    counts every token."""
    from transformers import BertTokenizer

    from capo_dist.rewards.steps import _vocab_size

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "step", "one", "=", "3", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    ids = tok.encode("step one = 3.", add_special_tokens=False) + [tok.sep_token_id]
    text = tok.decode(ids, skip_special_tokens=True)
    offs = token_char_offsets(tok, ids)
    assert len(offs) == len(ids) and "".join(text[s:e] for s, e in offs) == text
    assert offs[-1] == (len(text), len(text))
    assert _vocab_size(tok) == len(words)


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ("abc", "abcdef", 3),
        ("a\ufffd\ufffd", "a中b", 1),
        ("abcd\ufffd", "abcdefgh", 4),
        ("\ufffd", "中", 0),
        ("xyz", "abc", 0),
        ("", "abc", 0),
    ],
)
def test_common_prefix_len(a, b, n):
    from capo_dist.rewards.steps import _common_prefix_len

    assert _common_prefix_len(a, b) == n
