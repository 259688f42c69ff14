"""SentencePiece tokenizer with T5 conventions: pad 0, eos 1, unk 2, no bos.

A `Tokenizer` wraps one serialized SentencePiece model proto. The SHA-256 of those bytes is the
tokenizer's identity (`Tokenizer.sha256`): checkpoints, datasets and order logs record it so a
run never silently mixes vocabularies. Any model with the T5 special ids loads, including T5's
own `spiece.model`; `Tokenizer.train` builds a small one in memory for toy runs and tests,
with two control pieces at ids 3 and 4 (`PM_MARKER_PIECES`) that no text encodes to: the
preference models mark the ends of y1 and y2 with them (`ipo_gap.preference`).

Batches are fixed-shape numpy arrays (`Encoded`): ids padded with `PAD_ID`, a 0/1 mask that
covers real tokens including the final EOS, and the per-row lengths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Two control pieces every trained tokenizer reserves at ids 3 and 4: text never encodes to
# them, so the preference models' segment markers and readout (`ipo_gap.preference`) are
# tokens no prompt or response contains.
PM_MARKER_PIECES = ("<pm_a>", "<pm_b>")
PM_MARKER_IDS = (3, 4)


class TokenizerError(ValueError):
    """A model file or proto is unusable: unreadable, not SentencePiece, or wrong special ids."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A padded batch of token ids.

    Attributes:
        ids: int32 [B, max_len], token ids followed by `PAD_ID`.
        mask: int32 [B, max_len], 1 on real tokens (EOS included), 0 on padding.
        lengths: int32 [B], number of real tokens per row (= mask.sum(-1)).
        num_truncated: how many texts did not fit in `max_len` and were cut.
    """

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    num_truncated: int


_SPACE = "\u2581"  # SentencePiece's whitespace meta symbol.


class _CheckedStrings:
    """Iterates `texts` for the trainer, keeping the first non-str as an error to re-raise.

    SentencePiece turns an exception raised inside its sentence iterator into a RuntimeError;
    keeping the TypeError here lets `Tokenizer.train` raise it as such.
    """

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.error: TypeError | None = None

    def __iter__(self) -> Iterator[str]:
        for i, text in enumerate(self._texts):
            if not isinstance(text, str):
                self.error = TypeError(f"training text #{i} is {type(text).__name__}, not str")
                raise self.error
            yield text


class Tokenizer:
    """A SentencePiece model with pad 0, eos 1, unk 2; encodes to padded numpy batches.

    Build one with `Tokenizer.train`, `Tokenizer.load` or `Tokenizer.from_proto`; the
    constructor is internal.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, proto: bytes, source: str):
        self._sp = processor
        self._proto = proto
        self._source = source
        self._sha256 = hashlib.sha256(proto).hexdigest()
        # Whether the normalizer prepends a space (T5's does); `decode` drops it again.
        self._dummy_prefix = processor.normalize("x").startswith(_SPACE)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        max_sentence_length: int = 16384,
    ) -> Tokenizer:
        """Trains a model in memory on `texts`, deterministically.

        Training runs single-threaded on the whole corpus (no sentence sampling), so the same
        texts in the same order give the same proto bytes, hence the same `sha256`.

        Ids 3 and 4 are the control pieces `PM_MARKER_PIECES`, which `encode` never emits.

        `hard_vocab_limit=False` is set so that a small corpus which cannot fill `vocab_size`
        pieces does not fail: `vocab_size` is then an upper bound and the trained model may be
        smaller; read `Tokenizer.vocab_size` for the real size.

        Args:
            texts: training sentences, one string each. Sentences longer than
                `max_sentence_length` bytes are skipped by the trainer.
            vocab_size: the target (maximum) vocabulary size, special pieces included.
            model_type: "unigram", "bpe", "word" or "char".
            character_coverage: fraction of characters the model must cover; 1.0 keeps all.
            max_sentence_length: longest sentence used for training, in bytes.

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: if `vocab_size` leaves no room beyond the five reserved pieces.
            TypeError: if an element of `texts` is not a str.
            TokenizerError: if SentencePiece training fails (e.g. an empty corpus).
        """
        if vocab_size <= 5:
            raise ValueError(f"vocab_size must exceed the 5 reserved pieces, got {vocab_size}")
        writer = io.BytesIO()
        checked = _CheckedStrings(texts)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(checked),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                max_sentence_length=max_sentence_length,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                bos_id=-1,
                control_symbols=list(PM_MARKER_PIECES),
                hard_vocab_limit=False,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if checked.error is not None:
                raise checked.error from None
            raise TokenizerError(f"SentencePiece training failed: {e}") from e
        return cls.from_proto(writer.getvalue(), source="<trained>")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a `.model` file (for example T5's `spiece.model`).

        Raises:
            TokenizerError: naming `path`, if it is missing, unreadable, empty, not a
                SentencePiece model, or has special ids other than pad 0, eos 1, unk 2.
        """
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                proto = f.read()
        except FileNotFoundError as e:
            raise TokenizerError(f"{source}: tokenizer model file not found") from e
        except OSError as e:
            raise TokenizerError(f"{source}: cannot read tokenizer model ({e})") from e
        return cls.from_proto(proto, source=source)

    @classmethod
    def from_proto(cls, proto: bytes, *, source: str = "<bytes>") -> Tokenizer:
        """Builds a tokenizer from serialized model proto bytes.

        Args:
            proto: the serialized SentencePiece `ModelProto`.
            source: where the bytes came from, used in error messages.

        Raises:
            TokenizerError: if the bytes are empty, not a SentencePiece model, or the special
                ids are not pad 0, eos 1, unk 2.
        """
        proto = bytes(proto)
        if not proto:
            raise TokenizerError(f"{source}: empty file, not a SentencePiece model")
        try:
            processor = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise TokenizerError(f"{source}: not a valid SentencePiece model ({e})") from e
        got = {"pad": processor.pad_id(), "eos": processor.eos_id(), "unk": processor.unk_id()}
        want = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}
        if got != want:
            raise TokenizerError(
                f"{source}: special ids {got} differ from the T5 convention {want}"
            )
        return cls(processor, proto, source)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the serialized model proto to `path` (loadable by `load` or SentencePiece),
        atomically (`jsonl.write_file_atomic`; one writer in a multi-host job)."""
        from ipo_gap import jsonl

        jsonl.write_file_atomic(path, lambda f: f.write(self._proto))

    @property
    def proto(self) -> bytes:
        """The serialized SentencePiece model proto."""
        return self._proto

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of `proto`: the tokenizer's identity."""
        return self._sha256

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special pieces included."""
        return self._sp.vocab_size()

    @property
    def reserves_pm_markers(self) -> bool:
        """Whether ids 3 and 4 are control pieces that no text encodes to (every tokenizer
        `train` made); in a loaded model such as T5's `spiece.model` they are ordinary pieces,
        and a response containing them looks to a preference model like a segment's end."""
        return self.vocab_size > max(PM_MARKER_IDS) and all(
            self._sp.IsControl(i) for i in PM_MARKER_IDS
        )

    def pm_ids_for(self, model_vocab_size: int) -> tuple[int, int]:
        """The ids a preference model with `model_vocab_size` embedding rows should use as its
        markers and readout (`T5Config.pm_ids`): 3 and 4 where this tokenizer reserves them;
        else the first two rows past its pieces, which no text encodes to (T5's checkpoints
        have 32128 rows for the 32000 pieces of its `spiece.model`); else 3 and 4 anyway,
        which are then ordinary pieces (`pm_marker_note` says so)."""
        if self.reserves_pm_markers or model_vocab_size < self.vocab_size + 2:
            return PM_MARKER_IDS
        return (self.vocab_size, self.vocab_size + 1)

    def pm_marker_note(self, ids: tuple[int, int] = PM_MARKER_IDS) -> str:
        """One line for reports: whether the preference models' markers `ids` are tokens no
        text encodes to."""
        if tuple(ids) == PM_MARKER_IDS and self.reserves_pm_markers:
            return "reserved control pieces 3, 4 (no text encodes to them)"
        if min(ids) >= self.vocab_size:
            return (
                f"ids {ids[0]}, {ids[1]}: embedding rows past the tokenizer's {self.vocab_size} "
                "pieces (no text encodes to them)"
            )
        pieces = [self._sp.id_to_piece(i) for i in ids if i < self.vocab_size]
        return (
            f"ordinary pieces {ids[0]}, {ids[1]} ({', '.join(map(repr, pieces))}) of a loaded "
            "tokenizer, and the model has no spare rows: a text containing them looks to the "
            "PMs like the end of a response"
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size}, "
            f"sha256={self._sha256[:12]}...)"
        )

    def normalize(self, text: str) -> str:
        """The text after the model's normalizer (NFKC, whitespace clean-up).

        This is what `decode(encode([text]))` returns when every character is in the
        vocabulary and nothing is truncated.
        """
        normalized = self._sp.normalize(text).replace(_SPACE, " ")
        if self._dummy_prefix and normalized.startswith(" "):
            normalized = normalized[1:]
        return normalized

    def encode_as_ids(self, text: str) -> list[int]:
        """Raw token ids of one text, without EOS."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return self._sp.encode(text, out_type=int)

    def encode(
        self,
        texts: Sequence[str],
        max_len: int,
        *,
        add_eos: bool = True,
        truncate: str = "right",
    ) -> Encoded:
        """Encodes a batch of texts to fixed-length padded arrays.

        A text whose tokens (plus EOS) do not fit is truncated: with truncate="right" the
        first `max_len - 1` tokens are kept (the first `max_len` without EOS), with "left" the
        last ones (for prompts whose end matters: a dialogue's last turn, "TL;DR:"); EOS
        always ends the row when `add_eos`. Truncated rows are counted (`num_truncated`).

        Args:
            texts: the texts; a bare str is rejected (it would be read as characters).
            max_len: the row length, at least 2.
            add_eos: whether to end every row with `EOS_ID`.
            truncate: "right" (keep the beginning) or "left" (keep the end).

        Returns:
            An `Encoded` batch with B = len(texts).
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single str")
        if truncate not in ("right", "left"):
            raise ValueError(f"truncate must be 'right' or 'left', got {truncate!r}")
        if max_len < 2:
            raise ValueError(
                f"max_len must be at least 2 (room for a token and EOS), got {max_len}"
            )
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text #{i} is {type(text).__name__}, not str")
        rows = self._sp.encode(texts, out_type=int) if texts else []
        ids = np.full((len(texts), max_len), PAD_ID, dtype=np.int32)
        lengths = np.zeros((len(texts),), dtype=np.int32)
        room = max_len - 1 if add_eos else max_len
        num_truncated = 0
        for i, row in enumerate(rows):
            if len(row) > room:
                num_truncated += 1
                row = row[:room] if truncate == "right" else row[len(row) - room :]
            if add_eos:
                row = [*row, EOS_ID]
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int32)
        return Encoded(ids=ids, mask=mask, lengths=lengths, num_truncated=num_truncated)

    def decode(self, ids) -> list[str]:
        """Decodes rows of token ids to strings.

        Each row is read up to its first `EOS_ID`; `PAD_ID` tokens are skipped.

        Args:
            ids: int array-like [B, T], or [T] for a single sequence.

        Returns:
            B strings (one string for 1-D input, still in a list).

        Raises:
            ValueError: if `ids` is not 1-D or 2-D, or holds an id outside [0, vocab_size).
        """
        arr = np.asarray(ids)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"decode expects 1-D or 2-D ids, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)]
            raise ValueError(
                f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})"
            )
        rows = []
        for row in arr.tolist():
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            rows.append([t for t in row if t != PAD_ID])
        return self._sp.decode(rows) if rows else []
