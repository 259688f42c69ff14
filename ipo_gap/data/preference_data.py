"""Real human-preference datasets as labelled pairs (x, y_w, y_l) of strings, split by prompt.

Formats read, and the choices made (each loader returns `(pairs, LoadReport)`):

- Anthropic HH-RLHF (helpful-base, harmless-base): gzip JSON lines `{"chosen", "rejected"}`, each a
  whole dialogue whose turns start with "\\n\\nHuman: " / "\\n\\nAssistant: ". The prompt is the
  longest prefix the two transcripts share that ends with "\\n\\nAssistant:", and that cut must
  also be the first "\\n\\nAssistant:" after the last "\\n\\nHuman:" of both (the prompt holds the
  final Human turn, responses hold no turn of the dialogue); otherwise the record is bad. Each
  response is the rest less its one leading space, so `prompt + " " + chosen` is the original
  string. Responses that themselves contain "\\n\\nAssistant:" (the model wrote a turn of its own)
  are kept whole and counted in `notes`: cutting each transcript at its own last marker, as
  commonly done, would give the two responses different prompts.
- OpenAI summarize-from-feedback comparisons (`batch*.json`, JSON lines despite the suffix):
  `info.{post,title,subreddit}`, `summaries[2].text`, `choice` (0/1), `split`. The prompt is the
  original work's query format (openai/summarize-from-feedback),
  "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"; responses are the
  summary texts less their one leading space. CNN/DM records (`info.article`, no post) are bad.
  Several workers labelled some comparisons: a pair equal to an earlier one, or its reverse
  (the opposite label), is kept and counted in `notes` (earlier in any file of the same load,
  as for every format).
- Chatbot Arena conversations (parquet): `conversation_a/b` lists of `{content, role}`, `winner` in
  model_a / model_b / tie / tie (bothbad). Responses are the final assistant turns. A single-turn
  prompt is the user's message as is; a multi-turn prompt is the shared conversation formatted
  as "User: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant:". When the earlier
  assistant turns of a and b differ (each model answered every turn), there is no shared prompt:
  such rows are skipped and counted, as are ties. Different user turns in a and b make a bad
  record.
- Arena human-preference 55k (`train.csv`): `prompt`, `response_a`, `response_b` are JSON lists of
  strings (one per turn, responses may be null) and `winner_model_a/_b/_tie` one-hot; prompts are
  formatted as for the parquet data.

Bad input never passes silently: a malformed record raises `BadRecordError` ("file:line: reason";
`line` is the 1-based line of a JSON-lines file, or the 0-based data row of a parquet/CSV file),
or with `skip_bad_records=True` is counted with the first few reasons kept. Unreadable files
(truncated or invalid gzip, bytes that are not UTF-8, no records) raise `DataFileError` whatever
the flag. Blank lines are not records. Identical responses are skipped and counted; a pair
with an empty (whitespace-only) response is kept and counted in `notes`. Text that is not
valid Unicode (a lone surrogate escaped in JSON, which no tokenizer can encode) makes a bad
record.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import random
import zlib
from collections.abc import Callable

from ipo_gap import hosts, jsonl
from ipo_gap.data import embedded_task

_H, _A = "\n\nHuman:", "\n\nAssistant:"
_MAX_EXAMPLES = 5
_SPLITS = ("test", "valid", "train")  # Filled in this order.


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    where: str  # "file:line" of the record.


class BadRecordError(ValueError):
    """One malformed record: names its file, line (or data row) and what was wrong."""

    def __init__(self, file, line, reason):
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = str(file), line, reason


class DataFileError(ValueError):
    """A file that cannot be read as a whole (truncated gzip, not UTF-8, empty, wrong columns)."""


@dataclasses.dataclass
class LoadReport:
    files: list[str] = dataclasses.field(default_factory=list)
    records: int = 0  # Records read.
    pairs: int = 0  # Pairs kept.
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # Reason -> count.
    examples: list[str] = dataclasses.field(default_factory=list)  # First skipped bad records.
    notes: dict[str, int] = dataclasses.field(default_factory=dict)  # Kept, but worth knowing.

    def summary(self) -> str:
        out = f"{len(self.files)} file(s), {self.records} records -> {self.pairs} pairs"
        if self.skipped:
            out += "; skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        if self.notes:
            out += "; kept with notes: " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.notes.items())
            )
        if self.examples:
            out += f"; first bad record: {self.examples[0]}"
        return out


class _Bad(Exception):
    """A malformed record (message: the reason)."""


class _Skip(Exception):
    """A well-formed record that yields no pair (message: the reason)."""


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _check_unicode(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(f"{name} is not valid Unicode text: {e.reason} at character {e.start}") from None


def _collect(
    files, records, parse, skip_bad: bool, seen: set | None = None
) -> tuple[list[Pair], LoadReport]:
    """Turns (file, line, raw) records into pairs with `parse(raw, notes) -> (x, y_w, y_l)`.

    `seen` holds the (prompt, chosen, rejected) of the pairs kept so far: pass one set to every
    file of a load, so that a pair repeated in a later file is counted as a duplicate too.
    """
    report, pairs = LoadReport(files=[str(f) for f in files]), []
    seen = set() if seen is None else seen
    for file, line, raw in records:
        report.records += 1
        notes: dict[str, int] = {}  # Counted only for pairs kept.
        try:
            prompt, chosen, rejected = parse(raw, notes)
            for name, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                _check_unicode(name, text)
        except _Skip as e:
            _count(report.skipped, str(e))
            continue
        except _Bad as e:
            if not skip_bad:
                raise BadRecordError(file, line, str(e)) from None
            _count(report.skipped, "bad record")
            if len(report.examples) < _MAX_EXAMPLES:
                report.examples.append(f"{file}:{line}: {e}")
            continue
        if chosen == rejected:
            _count(report.skipped, "identical responses")
            continue
        if not chosen.strip() or not rejected.strip():
            notes["empty response"] = 1
        if (prompt, chosen, rejected) in seen:
            notes["the same pair as an earlier record (kept)"] = 1
        elif (prompt, rejected, chosen) in seen:
            notes["an earlier record has the opposite label (kept)"] = 1
        seen.add((prompt, chosen, rejected))
        pairs.append(Pair(prompt, chosen, rejected, f"{file}:{line}"))
        report.pairs += 1
        for key in notes:
            _count(report.notes, key)
    return pairs, report


def _merge(results) -> tuple[list[Pair], LoadReport]:
    pairs, total = [], LoadReport()
    for p, r in results:
        pairs += p
        total.files += r.files
        total.records += r.records
        total.pairs += r.pairs
        total.examples = (total.examples + r.examples)[:_MAX_EXAMPLES]
        for mine, theirs in ((total.skipped, r.skipped), (total.notes, r.notes)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
    return pairs, total


def _jsonl_records(path):
    """(path, 1-based line, text) of each non-blank line of a JSON-lines file, gzip if *.gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    line, n = 0, 0
    try:
        with opener(path, "rb") as f:
            for line, raw in enumerate(f, 1):  # noqa: B007 (line is read after the loop)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFileError(
                        f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                    ) from None
                if text.strip():
                    n += 1
                    yield path, line, text
    except EOFError:
        raise DataFileError(
            f"{path}: truncated gzip stream after line {line}: the records after it are lost"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataFileError(f"{path}: not a valid gzip file ({e})") from None
    if n == 0:
        raise DataFileError(f"{path}: empty file (no records)")


def _json_object(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict, key: str, typ: type, name: str | None = None):
    name = name or key
    if key not in obj:
        raise _Bad(f"missing field '{name}'")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise _Bad(f"field '{name}': expected {typ.__name__}, got {type(value).__name__}")
    return value


def _strip_space(response: str, notes: dict[str, int]) -> str:
    if response.startswith(" "):
        return response[1:]
    _count(notes, "response without leading space")
    return response


# ------------------------------------------------------------------------------- HH-RLHF


def _hh_parse(text: str, notes: dict[str, int]) -> tuple[str, str, str]:
    rec = _json_object(text)
    chosen, rejected = _field(rec, "chosen", str), _field(rec, "rejected", str)
    cut = os.path.commonprefix([chosen, rejected]).rfind(_A)
    if cut < 0:
        raise _Bad("chosen and rejected share no prefix ending with '\\n\\nAssistant:'")
    cut += len(_A)
    for name, s in (("chosen", chosen), ("rejected", rejected)):
        last_human = s.rfind(_H)
        if last_human < 0:
            raise _Bad(f"{name} has no '\\n\\nHuman:' turn")
        if s.find(_A, last_human) + len(_A) != cut:
            raise _Bad(
                f"the shared prefix of chosen and rejected does not end at the final Assistant "
                f"turn of {name} (the transcripts differ before it, or a turn holds a marker)"
            )
    responses = [_strip_space(s[cut:], notes) for s in (chosen, rejected)]
    if any(_A in r for r in responses):
        _count(notes, "response contains '\\n\\nAssistant:'")
    return chosen[:cut], responses[0], responses[1]


def load_hh_rlhf(path, *, skip_bad_records=False, seen=None) -> tuple[list[Pair], LoadReport]:
    """Pairs of one HH-RLHF file (e.g. helpful-base/test.jsonl.gz); `seen`: see `_collect`."""
    return _collect([path], _jsonl_records(path), _hh_parse, skip_bad_records, seen)


# ------------------------------------------------------------------------- TL;DR comparisons


def _tldr_parser(splits):
    def parse(text: str, notes: dict[str, int]) -> tuple[str, str, str]:
        rec = _json_object(text)
        info = _field(rec, "info", dict)
        if "post" not in info:
            raise _Bad(
                "info has no 'post'"
                + (
                    " but an 'article' (a CNN/DM record, not Reddit TL;DR)"
                    if "article" in info
                    else ""
                )
            )
        post = _field(info, "post", str, "info.post")
        title = _field(info, "title", str, "info.title")
        subreddit = _field(info, "subreddit", str, "info.subreddit")
        summaries = _field(rec, "summaries", list)
        if len(summaries) != 2:
            raise _Bad(f"field 'summaries': expected 2 summaries, got {len(summaries)}")
        texts = []
        for i, s in enumerate(summaries):
            if not isinstance(s, dict):
                raise _Bad(f"field 'summaries[{i}]': expected dict, got {type(s).__name__}")
            texts.append(_field(s, "text", str, f"summaries[{i}].text"))
        choice = _field(rec, "choice", int)
        if choice not in (0, 1):
            raise _Bad(f"field 'choice': expected 0 or 1, got {choice}")
        if splits is not None and _field(rec, "split", str) not in splits:
            raise _Skip("split not selected")
        prompt = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
        return prompt, _strip_space(texts[choice], notes), _strip_space(texts[1 - choice], notes)

    return parse


def load_tldr(
    paths: list, *, splits: tuple[str, ...] | None = None, skip_bad_records=False
) -> tuple[list[Pair], LoadReport]:
    """Pairs of TL;DR comparison files, optionally only those whose `split` is in `splits`.

    Duplicates are counted across the files (one comparison can be in two batches)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    parse = _tldr_parser(None if splits is None else tuple(splits))
    seen: set[tuple[str, str, str]] = set()
    return _merge(_collect([p], _jsonl_records(p), parse, skip_bad_records, seen) for p in paths)


# ------------------------------------------------------------------------- Chatbot Arena

_WINNERS = {"model_a": 0, "model_b": 1, "tie": "tie", "tie (bothbad)": "tie (both bad)"}


def _chat_prompt(user_turns: list, answers_a: list, answers_b: list) -> str:
    """The prompt of the final turn; `answers_*` are the earlier assistant turns."""
    if len(user_turns) == 1:
        return user_turns[0]
    if answers_a != answers_b or None in answers_a:
        raise _Skip("multi-turn, earlier assistant turns differ")
    parts = []
    for user, answer in zip(user_turns[:-1], answers_a, strict=True):
        parts += [f"User: {user}", f"Assistant: {answer}"]
    return "\n\n".join([*parts, f"User: {user_turns[-1]}", "Assistant:"])


def _conversation(turns, name: str) -> tuple[list[str], list[str]]:
    """(user turns, assistant turns) of an alternating user/assistant conversation."""
    if not isinstance(turns, list) or not turns:
        raise _Bad(f"field '{name}': expected a non-empty list of turns")
    for i, turn in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or turn.get("role") != want:
            raise _Bad(f"{name}[{i}]: expected a {want} turn (user/assistant alternating)")
        _field(turn, "content", str, f"{name}[{i}].content")
    if len(turns) % 2:
        raise _Bad(f"field '{name}': ends with a user turn, no final answer")
    return [t["content"] for t in turns[::2]], [t["content"] for t in turns[1::2]]


def _arena_parse(row: dict, notes: dict[str, int]) -> tuple[str, str, str]:
    (users, answers_a), (users_b, answers_b) = (
        _conversation(row.get(f"conversation_{s}"), f"conversation_{s}") for s in "ab"
    )
    winner = _WINNERS.get(row.get("winner"))
    if winner is None:
        raise _Bad(f"field 'winner': expected one of {sorted(_WINNERS)}, got {row.get('winner')!r}")
    if users != users_b:
        raise _Bad("user turns differ between conversation_a and conversation_b")
    if isinstance(winner, str):
        raise _Skip(winner)
    prompt = _chat_prompt(users, answers_a[:-1], answers_b[:-1])
    finals = (answers_a[-1], answers_b[-1])
    return prompt, finals[winner], finals[1 - winner]


def load_arena_parquet(path, *, skip_bad_records=False, seen=None) -> tuple[list[Pair], LoadReport]:
    """Pairs of a Chatbot Arena conversations parquet file (needs the `arena` extra: pyarrow);
    `seen`: see `_collect`."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            'reading Chatbot Arena parquet needs pyarrow: pip install "ipo_gap[arena]"'
        ) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    columns = ["conversation_a", "conversation_b", "winner"]
    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataFileError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataFileError(f"{path}: missing columns {missing} (has {pf.schema_arrow.names})")
    if pf.metadata.num_rows == 0:
        raise DataFileError(f"{path}: empty file (no records)")

    def rows():
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                for record in batch.to_pylist():
                    yield path, row, record
                    row += 1
        except pyarrow.ArrowException as e:
            raise DataFileError(f"{path}: unreadable after data row {row} ({e})") from None

    return _collect([path], rows(), _arena_parse, skip_bad_records, seen)


_CSV_COLUMNS = ("prompt", "response_a", "response_b", "winner_model_a", "winner_model_b")
_CSV_WINNERS = ("winner_model_a", "winner_model_b", "winner_tie")


def _csv_rows(path):
    """(path, 0-based data row, dict) of a CSV file with a header line."""
    limit = csv.field_size_limit(2**31 - 1)  # Responses can exceed the default 128 KiB.
    row, empty = 0, True
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataFileError(f"{path}: empty file (no header)")
            missing = [c for c in (*_CSV_COLUMNS, "winner_tie") if c not in header]
            if missing:
                raise DataFileError(f"{path}: missing columns {missing} (header {header})")
            for row, fields in enumerate(reader):  # noqa: B007 (row is read after the loop)
                yield path, row, (header, fields)
                empty = False
            if empty:
                raise DataFileError(f"{path}: no data rows")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text near data row {row} ({e.reason})") from None
    except csv.Error as e:
        raise DataFileError(f"{path}: CSV error near data row {row} ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _json_list(text: str, name: str) -> list:
    try:
        value = json.loads(text, strict=False)  # Raw newlines inside strings are fine.
    except json.JSONDecodeError as e:
        raise _Bad(f"column '{name}': invalid JSON ({e})") from None
    if not isinstance(value, list) or not value:
        raise _Bad(f"column '{name}': expected a non-empty JSON list, got {text[:40]!r}")
    if not all(v is None or isinstance(v, str) for v in value):
        raise _Bad(f"column '{name}': expected strings or null")
    return value


def _arena_csv_parse(raw, notes: dict[str, int]) -> tuple[str, str, str]:
    header, fields = raw
    if len(fields) != len(header):
        raise _Bad(f"expected {len(header)} fields, got {len(fields)}")
    row = dict(zip(header, fields, strict=True))
    try:
        winner = [int(row[c]) for c in _CSV_WINNERS]
    except ValueError:
        raise _Bad(f"winner columns are not integers: {[row[c] for c in _CSV_WINNERS]}") from None
    if sorted(winner) != [0, 0, 1]:
        raise _Bad(f"winner columns {dict(zip(_CSV_WINNERS, winner, strict=True))} are not one-hot")
    users, ans_a, ans_b = (_json_list(row[c], c) for c in _CSV_COLUMNS[:3])
    if None in users:
        raise _Bad("column 'prompt': a user turn is null")
    if not len(users) == len(ans_a) == len(ans_b):
        raise _Bad(
            f"prompt/response_a/response_b have {len(users)}/{len(ans_a)}/{len(ans_b)} turns"
        )
    for name, answers in (("response_a", ans_a), ("response_b", ans_b)):
        if answers[-1] is None:
            raise _Bad(f"column '{name}': the final response is null")
    if winner[2]:
        raise _Skip("tie")
    prompt, won = _chat_prompt(users, ans_a[:-1], ans_b[:-1]), winner.index(1)
    finals = (ans_a[-1], ans_b[-1])
    return prompt, finals[won], finals[1 - won]


def load_arena_csv(path, *, skip_bad_records=False, seen=None) -> tuple[list[Pair], LoadReport]:
    """Pairs of the Arena human-preference 55k CSV (train.csv); `seen`: see `_collect`."""
    return _collect([path], _csv_rows(path), _arena_csv_parse, skip_bad_records, seen)


# ------------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task's files come from and how they are read."""

    patterns: tuple[str, ...]  # File-name patterns inside the data folder.
    url: str  # Where to download them.
    format: str  # What the files hold.
    load: Callable[[list[pathlib.Path], bool], tuple[list[Pair], LoadReport]]


def _each(loader):
    """A task's loader: `loader` on each file, duplicates counted across the files."""

    def load(paths, skip):
        seen: set[tuple[str, str, str]] = set()
        return _merge(loader(p, skip_bad_records=skip, seen=seen) for p in paths)

    return load


_HH_URL = "https://github.com/anthropics/hh-rlhf/tree/master/"
_HH_FORMAT = "gzip JSON lines {chosen, rejected}, e.g. train.jsonl.gz and test.jsonl.gz"
TASKS: dict[str, TaskSpec] = {
    "hh_helpful": TaskSpec(
        ("*.jsonl.gz",), _HH_URL + "helpful-base", _HH_FORMAT, _each(load_hh_rlhf)
    ),
    "hh_harmless": TaskSpec(
        ("*.jsonl.gz",), _HH_URL + "harmless-base", _HH_FORMAT, _each(load_hh_rlhf)
    ),
    "tldr": TaskSpec(
        ("*.json", "*.jsonl"),
        "https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons/"
        " (listed in github.com/openai/summarize-from-feedback)",
        "JSON lines comparisons {info, summaries, choice, split}, e.g. batch13.json",
        lambda paths, skip: load_tldr(paths, skip_bad_records=skip),
    ),
    "arena": TaskSpec(
        ("*.parquet",),
        "https://huggingface.co/datasets/lmsys/chatbot_arena_conversations (gated; data/*.parquet)",
        "parquet rows {conversation_a, conversation_b, winner, ...}",
        _each(load_arena_parquet),
    ),
    "arena_55k": TaskSpec(
        ("train.csv",),
        "https://huggingface.co/datasets/lmsys/lmsys-arena-human-preference-55k (or Kaggle)",
        "CSV with columns prompt, response_a, response_b (JSON lists), winner_model_a/_b/_tie",
        _each(load_arena_csv),
    ),
}


def _task_files(name: str, data_dir) -> list[pathlib.Path]:
    if name not in TASKS:
        raise ValueError(f"unknown preference task {name!r}; known: {sorted(TASKS)}")
    spec, folder = TASKS[name], pathlib.Path(data_dir)
    files = sorted({p for pat in spec.patterns for p in folder.glob(pat) if p.is_file()})
    if not files:
        where = folder if folder.is_dir() else f"{folder} (no such folder)"
        raise FileNotFoundError(
            f"task {name!r}: no file matching {' or '.join(spec.patterns)} in {where}; expected "
            f"{spec.format}; download from {spec.url}"
        )
    return files


def load_task_pairs(name: str, data_dir, *, skip_bad_records=False):
    """Every pair of the task's files found in the folder `data_dir` (sorted by file name)."""
    files = _task_files(name, data_dir)
    return TASKS[name].load(files, skip_bad_records)


@dataclasses.dataclass
class PreferenceTask:
    """Prompts and labelled pairs of a real dataset by split (the pipeline's TaskData duck type).

    pairs[split] ("train", "valid", "test"): dicts {prompt, chosen, rejected, where};
    prompts["rl"]: policy-training prompts (train prompts), prompts["eval"]: win-rate prompts
    (never train prompts); report: loader counts, requested and obtained sizes.
    """

    name: str
    pairs: dict[str, list[dict]]
    prompts: dict[str, list[str]]
    report: dict

    def corpus(self):
        """Every string of the task (tokenizer training text), in a fixed order."""
        return embedded_task.task_corpus(self.pairs, self.prompts)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> PreferenceTask:
        return cls(**d)


def split_task(
    name: str,
    pairs: list[Pair],
    report: LoadReport,
    *,
    seed: int,
    num_train: int,
    num_valid: int,
    num_test: int,
    num_rl_prompts: int,
    num_eval_prompts: int,
) -> PreferenceTask:
    """Splits pairs by prompt (all pairs of a prompt in one split), deterministically from seed.

    Distinct prompts are shuffled, then fill test, valid and train in turn up to the requested
    pair counts (a prompt at a boundary contributes only the pairs that fit; its other pairs are
    dropped, never moved to another split). RL prompts are distinct train prompts; evaluation
    prompts are test prompts, then prompts no split used. With too little data each split gets
    what exists (see report["requested"] vs report["obtained"]); an empty split is an error.
    """
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.prompt, []).append(p)
    order = list(groups)  # First-occurrence order, then a seeded shuffle.
    rng = random.Random(f"preference-split:{name}:{seed}")
    rng.shuffle(order)
    requested = {"train": num_train, "valid": num_valid, "test": num_test}
    requested |= {"rl": num_rl_prompts, "eval": num_eval_prompts}
    out = {s: [] for s in _SPLITS}
    owned = {s: [] for s in _SPLITS}
    pos, dropped = 0, 0
    for split in _SPLITS:
        while len(out[split]) < requested[split] and pos < len(order):
            prompt, room = order[pos], requested[split] - len(out[split])
            pos += 1
            out[split] += groups[prompt][:room]
            dropped += max(0, len(groups[prompt]) - room)
            owned[split].append(prompt)
        rng.shuffle(out[split])
    prompts = {
        "rl": owned["train"][:num_rl_prompts],
        "eval": (owned["test"] + order[pos:])[:num_eval_prompts],
    }
    obtained = {s: len(out[s]) for s in _SPLITS} | {s: len(v) for s, v in prompts.items()}
    for split, n in obtained.items():
        if n == 0 and requested[split] > 0:
            raise ValueError(
                f"task {name!r}: split {split!r} would be empty: {report.records} records gave "
                f"{len(pairs)} pairs over {len(order)} distinct prompts; requested {requested} "
                "(pairs for train/valid/test, filled test first; prompts for rl/eval)"
            )
    split_report = {
        "loader": dataclasses.asdict(report),
        "summary": report.summary(),
        "seed": seed,
        "requested": requested,
        "obtained": obtained,
        "distinct_prompts": len(order),
        "prompts_per_split": {s: len(owned[s]) for s in _SPLITS},
        "unused_prompts": len(order) - pos,
        "pairs_dropped_at_split_boundaries": dropped,
    }
    as_dicts = {s: [dataclasses.asdict(p) for p in out[s]] for s in _SPLITS}
    return PreferenceTask(name, as_dicts, prompts, split_report)


class TaskChangedError(ValueError):
    """A cached split (task.json) that no longer matches its data files or settings, where
    rebuilding it is refused (`load_or_make_task(refuse_changes=True)`): the stages already
    trained on the old split would be mixed with stages run on a new one."""


# 1: data files keyed by path, size and mtime (a touched file re-split the task);
# 2: by path, size and SHA-256 of the bytes.
_KEY_VERSION = 2


def _file_key(path: pathlib.Path) -> dict:
    """A data file's entry in the cache key: its resolved path, size and SHA-256."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"path": str(path.resolve()), "size": size, "sha256": digest.hexdigest()}


def _split_content(task: PreferenceTask) -> tuple:
    """What training sees of a split task: its pairs' texts by split and its prompts (not
    where the pairs were read, nor the loader's report)."""
    texts = {
        split: [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
        for split, rows in task.pairs.items()
    }
    return task.name, texts, task.prompts


def _key_changes(old, new: dict) -> list[str]:
    """What differs between a cached task's key (any version) and the current one, in words:
    data files added, removed and changed (by resolved path), then the other settings."""
    old = old if isinstance(old, dict) else {}

    def by_path(key: dict) -> dict:
        files = {}
        for entry in key.get("files") or []:
            if isinstance(entry, dict):
                files[entry.get("path")] = (entry.get("size"), entry.get("sha256"))
            elif isinstance(entry, list) and len(entry) == 3:  # version 1: path, size, mtime
                files[entry[0]] = (entry[1], None)
        return files

    was, now = by_path(old), by_path(new)
    both = sorted(set(was) & set(now))
    # A version-1 entry holds no content hash: the same size may hide other bytes.
    unknown = [f for f in both if was[f][1] is None and was[f][0] == now[f][0]]
    groups = {
        "files added": sorted(set(now) - set(was)),
        "files removed": sorted(set(was) - set(now)),
        "files changed": [f for f in both if was[f] != now[f] and f not in unknown],
        "files perhaps changed (task.json of older code holds no content hash)": unknown,
    }
    out = [f"{what}: {', '.join(map(str, files))}" for what, files in groups.items() if files]
    for field in ("name", "seed", "sizes", "skip_bad_records"):
        if old.get(field) != new[field]:
            out.append(f"{field} {old.get(field)!r} in task.json, {new[field]!r} now")
    return out


def load_or_make_task(
    cache_path,
    name: str,
    data_dir,
    *,
    seed: int,
    skip_bad_records=False,
    refuse_changes: bool = False,
    **sizes: int,
) -> PreferenceTask:
    """The split task, cached as JSON at `cache_path`.

    The cache is keyed by the task name, the data files (resolved path, size and SHA-256 of
    the bytes: touching a file changes nothing), the seed, the sizes and the skip flag. When
    the key differs the task is rebuilt from the files; the rebuilt task replaces the cache,
    unless `refuse_changes` (a study resuming on its task.json) and its split differs from the
    cached one (in any pair's texts, order or split, or in the prompts): then TaskChangedError
    names the cache file and what changed. A rebuild that gives the same split (files moved or
    copied, a cache of older code) rewrites the cache under the new key. With
    `refuse_changes`, an unreadable cache file is refused too.
    """
    files = _task_files(name, data_dir)
    key = {
        "version": _KEY_VERSION,
        "name": name,
        "files": [_file_key(f) for f in files],
        "seed": seed,
        "sizes": dict(sorted(sizes.items())),
        "skip_bad_records": skip_bad_records,
    }
    path = pathlib.Path(cache_path)
    cached = old_key = None
    if hosts.exists(path):
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
            old_key, cached = blob["key"], PreferenceTask.from_json(blob["task"])
        except (ValueError, OSError, KeyError, TypeError) as e:
            if refuse_changes:
                raise TaskChangedError(
                    f"{path}: unreadable ({type(e).__name__}: {e}), so whether the data in "
                    f"{data_dir} still gives the split that earlier stages were trained on "
                    "cannot be checked; use a new --workdir, or remove this workdir's stages "
                    f"and {path.name} to start afresh"
                ) from None
        else:
            if old_key == key:
                return cached
    pairs, report = load_task_pairs(name, data_dir, skip_bad_records=skip_bad_records)
    task = split_task(name, pairs, report, seed=seed, **sizes)
    if refuse_changes and cached is not None and _split_content(task) != _split_content(cached):
        changes = _key_changes(old_key, key) or ["the key's format"]
        raise TaskChangedError(
            f"{path}: the task no longer matches the data it was split from "
            f"({'; '.join(changes)}), and splitting the data in {data_dir} now gives another "
            f"split: the stages already finished beside {path.name} were trained on the old "
            "one, and the rest would run on the new one (old test prompts could land in train). "
            "Restore the data files as they were, or start afresh: use a new --workdir, or "
            f"remove this workdir's stages and {path.name}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_atomic(path, json.dumps({"key": key, "task": task.to_json()}))
    return task
