"""Tests for ipo_gap.tokenizer: T5 special ids, padding, truncation, determinism, loading."""

import io
import random

import numpy as np
import pytest
import sentencepiece as spm

from ipo_gap import tokenizer as tok

WORDS = (
    "the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "mat", "tree",
    "house", "big", "small", "red", "blue", "green", "quickly", "slowly", "happy", "sad", "river",
    "mountain"
)  # fmt: skip


def _corpus(seed: int = 0, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _train(texts, vocab_size=64):
    return tok.Tokenizer.train(iter(texts), vocab_size=vocab_size)


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def tk(corpus):
    return _train(corpus)


def _raw_proto(texts, **special_ids) -> bytes:
    """Trains through sentencepiece directly with the given special ids."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=writer,
        vocab_size=64,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **special_ids,
    )
    return writer.getvalue()


def test_special_ids(tk):
    assert (tok.PAD_ID, tok.EOS_ID, tok.UNK_ID) == (0, 1, 2)
    sp = spm.SentencePieceProcessor(model_proto=tk.proto)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.bos_id() == -1
    assert 3 < tk.vocab_size <= 64
    # Ordinary text never produces a special id.
    ids = tk.encode_as_ids("the cat sat on the mat")
    assert ids and min(ids) > tok.UNK_ID


def test_round_trip(tk, corpus):
    texts = corpus[:20]
    enc = tk.encode(texts, max_len=64)
    assert enc.num_truncated == 0
    assert tk.decode(enc.ids) == texts
    # Extra whitespace is normalised away, and normalize() says so.
    messy = "  the   cat sat  "
    assert tk.normalize(messy) == "the cat sat"
    assert tk.decode(tk.encode([messy], max_len=16).ids) == ["the cat sat"]
    # Newlines too, as in T5's spiece.model: HH's turn boundaries keep only the speaker words
    # (the README's real-data section says so).
    assert tk.normalize("\n\nthe cat:\n\nsat") == "the cat: sat"
    # A 1-D row decodes to a list of one string.
    assert tk.decode(enc.ids[0]) == [texts[0]]


def test_unknown_characters_map_to_unk(tk):
    ids = tk.encode_as_ids("cat \u4e2d dog")
    assert tok.UNK_ID in ids


def test_padding_mask_lengths_and_eos(tk):
    texts = ["the cat", "the big red dog ran quickly under the tree", ""]
    raw = [tk.encode_as_ids(t) for t in texts]
    assert raw[2] == []
    enc = tk.encode(texts, max_len=32)
    assert enc.ids.dtype == np.int32 and enc.mask.dtype == np.int32
    assert enc.lengths.dtype == np.int32
    assert enc.ids.shape == enc.mask.shape == (3, 32)
    np.testing.assert_array_equal(enc.lengths, [len(r) + 1 for r in raw])
    np.testing.assert_array_equal(enc.mask.sum(-1), enc.lengths)
    for i, r in enumerate(raw):
        n = len(r)
        assert enc.ids[i, :n].tolist() == r
        assert enc.ids[i, n] == tok.EOS_ID
        assert (enc.ids[i, n + 1 :] == tok.PAD_ID).all()
        assert enc.mask[i, : n + 1].all() and not enc.mask[i, n + 1 :].any()
    assert tk.decode(enc.ids) == ["the cat", texts[1], ""]


def test_no_eos(tk):
    enc = tk.encode(["the cat sat"], max_len=16, add_eos=False)
    raw = tk.encode_as_ids("the cat sat")
    assert enc.lengths.tolist() == [len(raw)]
    assert tok.EOS_ID not in enc.ids.tolist()[0]
    assert enc.ids[0, : len(raw)].tolist() == raw
    # Without EOS the whole row is usable.
    exact = tk.encode(["the cat sat"], max_len=len(raw), add_eos=False)
    assert exact.num_truncated == 0 and exact.ids[0].tolist() == raw


def test_truncation(tk, corpus):
    long_texts = [t for t in corpus if len(tk.encode_as_ids(t)) > 6][:5]
    short = "cat"
    assert len(tk.encode_as_ids(short)) <= 6
    texts = [*long_texts, short]
    enc = tk.encode(texts, max_len=7)
    assert enc.num_truncated == len(long_texts)
    for i, text in enumerate(long_texts):
        raw = tk.encode_as_ids(text)
        assert enc.ids[i, :6].tolist() == raw[:6]
        assert enc.ids[i, 6] == tok.EOS_ID
        assert enc.lengths[i] == 7 and enc.mask[i].all()
    assert enc.lengths[-1] == len(tk.encode_as_ids(short)) + 1
    # A text of exactly max_len - 1 tokens fits with its EOS: not truncated.
    n = len(tk.encode_as_ids(long_texts[0]))
    fit = tk.encode([long_texts[0]], max_len=n + 1)
    assert fit.num_truncated == 0 and fit.ids[0, -1] == tok.EOS_ID
    assert tk.encode([long_texts[0]], max_len=n).num_truncated == 1
    # Without EOS the first max_len tokens are kept.
    no_eos = tk.encode(long_texts[:1], max_len=4, add_eos=False)
    assert no_eos.ids[0].tolist() == tk.encode_as_ids(long_texts[0])[:4]
    assert no_eos.num_truncated == 1
    # Left truncation keeps the end (a prompt's last turn), still EOS-terminated.
    left = tk.encode(texts, max_len=7, truncate="left")
    assert left.num_truncated == len(long_texts)
    for i, text in enumerate(long_texts):
        raw = tk.encode_as_ids(text)
        assert left.ids[i, :6].tolist() == raw[-6:]
        assert left.ids[i, 6] == tok.EOS_ID
    assert left.ids[-1].tolist() == enc.ids[-1].tolist()  # short rows are unchanged
    with pytest.raises(ValueError, match="truncate"):
        tk.encode(texts, max_len=7, truncate="middle")


def test_bad_arguments(tk):
    with pytest.raises(ValueError, match="max_len"):
        tk.encode(["cat"], max_len=1)
    with pytest.raises(TypeError):
        tk.encode("the cat", max_len=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tk.decode(np.array([[3, tk.vocab_size, 1]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tk.decode([[-1]])


def test_decode_stops_at_eos_and_skips_pad(tk):
    a = tk.encode_as_ids("the cat")
    b = tk.encode_as_ids("dog")
    row = [tok.PAD_ID, *a, tok.PAD_ID, tok.EOS_ID, *b, tok.EOS_ID]
    assert tk.decode([row]) == ["the cat"]
    assert tk.decode([[tok.EOS_ID, *b]]) == [""]


def test_training_is_deterministic(corpus, tk):
    again = _train(corpus)
    assert again.proto == tk.proto
    assert again.sha256 == tk.sha256
    assert len(tk.sha256) == 64
    other = _train(_corpus(seed=1))
    assert other.sha256 != tk.sha256


def test_save_load_round_trip(tk, corpus, tmp_path):
    path = tmp_path / "toy.model"
    tk.save(path)
    assert path.read_bytes() == tk.proto
    loaded = tok.Tokenizer.load(path)
    assert loaded.sha256 == tk.sha256
    assert loaded.vocab_size == tk.vocab_size
    a, b = tk.encode(corpus[:10], max_len=9), loaded.encode(corpus[:10], max_len=9)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.num_truncated == b.num_truncated
    # Plain sentencepiece reads the saved file too.
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.encode("the cat") == tk.encode_as_ids("the cat")


@pytest.mark.parametrize(
    "content", [None, b"", b"this is not a sentencepiece model\n\x00\xff"], ids=str
)
def test_load_bad_files(tmp_path, content):
    path = tmp_path / "bad.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(tok.TokenizerError, match="bad.model"):
        tok.Tokenizer.load(path)


def test_load_directory_is_tokenizer_error(tmp_path):
    with pytest.raises(tok.TokenizerError, match=str(tmp_path)):
        tok.Tokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "special",
    [
        {"pad_id": -1, "eos_id": 1, "unk_id": 0, "bos_id": -1},  # sentencepiece's default minus bos
        {"pad_id": 3, "eos_id": 1, "unk_id": 2, "bos_id": 0},
        {"pad_id": 0, "eos_id": 2, "unk_id": 1, "bos_id": -1},
    ],
    ids=str,
)
def test_other_special_ids_rejected(corpus, tmp_path, special):
    proto = _raw_proto(corpus, **special)
    spm.SentencePieceProcessor(model_proto=proto)  # valid for sentencepiece itself
    with pytest.raises(tok.TokenizerError, match="special ids"):
        tok.Tokenizer.from_proto(proto, source="odd.model")
    path = tmp_path / "odd.model"
    path.write_bytes(proto)
    with pytest.raises(tok.TokenizerError, match="odd.model"):
        tok.Tokenizer.load(path)


def test_t5_style_proto_accepted(corpus):
    # The ids T5's spiece.model uses, trained outside Tokenizer.train (bpe for variety).
    proto = _raw_proto(corpus, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="bpe")
    t = tok.Tokenizer.from_proto(proto, source="t5-like")
    assert t.decode(t.encode(corpus[:3], max_len=64).ids) == corpus[:3]


def test_trained_tokenizers_reserve_the_pm_markers(corpus):
    """Ids 3 and 4 end y1 and y2 in a PM's packed input: a trained tokenizer makes them
    control pieces that no text encodes to (on the embedded task they were 'so' and 'very',
    words its hidden reward counts), even text spelling the pieces' names; a loaded model
    whose ids 3 and 4 are ordinary pieces says so."""
    from ipo_gap.data import embedded_task

    task = embedded_task.make_task(
        0, num_train=200, num_valid=20, num_test=20, num_rl_prompts=20, num_eval_prompts=20
    )
    texts = list(task.corpus())
    t = tok.Tokenizer.train(texts, vocab_size=384)
    assert t.reserves_pm_markers and "reserved" in t.pm_marker_note()
    assert [t._sp.id_to_piece(i) for i in tok.PM_MARKER_IDS] == list(tok.PM_MARKER_PIECES)
    ids = t.encode(texts + ["<pm_a> <pm_b> so very"], max_len=64).ids
    assert not np.isin(ids, tok.PM_MARKER_IDS).any()
    assert t.vocab_size <= 384  # the reserved pieces come out of the same budget
    proto = _raw_proto(corpus, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="bpe")
    loaded = tok.Tokenizer.from_proto(proto, source="t5-like")
    assert not loaded.reserves_pm_markers
    assert "ordinary pieces 3, 4" in loaded.pm_marker_note()
    assert np.isin(loaded.encode(corpus, max_len=64).ids, tok.PM_MARKER_IDS).any()
    # A model with rows past the loaded tokenizer's pieces (T5: 32128 for 32000) marks with
    # the first two of them; one without spare rows keeps 3 and 4, and the note says so.
    V = loaded.vocab_size  # noqa: N806
    assert t.pm_ids_for(V + 100) == (3, 4)
    assert loaded.pm_ids_for(V + 2) == (V, V + 1)
    assert "rows past the tokenizer's" in loaded.pm_marker_note((V, V + 1))
    assert loaded.pm_ids_for(V + 1) == (3, 4)


def test_train_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        tok.Tokenizer.train(["the cat"], vocab_size=5)
    with pytest.raises(TypeError):
        tok.Tokenizer.train(["the cat", 7], vocab_size=16)
    with pytest.raises(tok.TokenizerError):
        tok.Tokenizer.train([], vocab_size=16)
