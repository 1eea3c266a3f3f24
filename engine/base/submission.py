"""The two prediction files of the pipeline: the Kaggle segment CSV and G's video file.

**Kaggle submission** (REFERENCE §7 step 6)::

    Class,Segments
    3,abcd:0 abcd:5 efgh:120
    7,

One row per segment class, in ``segment_label_ids.csv`` order; the segment ids
``"<video id>:<start>"`` (start in seconds, a non-negative multiple of 5 written without
leading zeros, so that it matches the ground truth's ids) are best first, separated by
single spaces, at most 100,000 per row. A class with nothing to submit is an empty row.
``validate_submission`` reports every departure from this; ``write_submission`` refuses
to write one.

**Video predictions** (G ``inference.py``, REFERENCE §7 step 1)::

    VideoId,LabelConfidencePairs
    abcd,12 0.913 4 0.5

one line per video, (class, score) pairs formatted ``"%i %g"`` by descending score.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO, Union

from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS
from modloc.engine.base.vocab import default_segment_class_ids

SUBMISSION_HEADER = "Class,Segments"
VIDEO_PREDICTIONS_HEADER = "VideoId,LabelConfidencePairs"

PathOrFile = Union[str, "os.PathLike[str]", TextIO]

# A segment id: a rankable video id (check_rankable_id: no whitespace, control character,
# ':', ',' or '"'), then a start time that is a multiple of 5 (last digit 0 or 5) with no
# leading zero.
_VIDEO_ID = r'[^\s:,"\x00-\x1f\x7f-\x9f\ud800-\udfff]+'
_RANKABLE_ID = re.compile(_VIDEO_ID)
_QUOTE = '"'
_START_MULTIPLE_OF_5 = r"(?:[05]|[1-9][0-9]*[05])"
_SEGMENT_ID = re.compile(rf"({_VIDEO_ID}):(0|[1-9][0-9]*)")
# A whole row of well-formed ids: checked in one C-speed regex match, so that a
# 100,000-segment row is only examined id by id when something in it is wrong.
_WELL_FORMED_ROW = re.compile(
    rf"{_VIDEO_ID}:{_START_MULTIPLE_OF_5}(?: {_VIDEO_ID}:{_START_MULTIPLE_OF_5})*"
)
_CLASS_ID = re.compile(r"[0-9]+")


class ProblemKind(str, enum.Enum):
    """What can be wrong with a submission file."""

    EMPTY_FILE = "empty file"
    MISSING_HEADER = "missing header"  # line 1 is not 'Class,Segments'
    EXTRA_HEADER = "extra header"  # a header line after line 1
    BLANK_LINE = "blank line"
    MALFORMED_ROW = "malformed row"  # not 'class,ids', or an empty id (stray space)
    QUOTED_FIELD = "quoted field"  # a '"': CSV readers would read a quoted field there
    BAD_CLASS = "bad class"  # the class field is not a non-negative integer
    UNKNOWN_CLASS = "unknown class"  # not one of the segment classes
    REPEATED_CLASS = "repeated class"  # a second row for a class
    MISSING_CLASS = "missing class"  # a segment class without a row
    BAD_SEGMENT = "bad segment"  # not '<vid>:<start>', start a multiple of 5
    DUPLICATE_SEGMENT = "duplicate segment"  # an id twice in one row
    TOO_MANY_SEGMENTS = "too many segments"  # a row longer than the limit


# Problems that leave no single reading of the file; even a lenient read stops on them.
_STRUCTURAL = {
    ProblemKind.EXTRA_HEADER,
    ProblemKind.MALFORMED_ROW,
    ProblemKind.QUOTED_FIELD,
    ProblemKind.BAD_CLASS,
    ProblemKind.REPEATED_CLASS,
}


@dataclass(frozen=True)
class Problem:
    """One departure from the submission format; ``line`` is 1-based (the header is 1)."""

    kind: ProblemKind
    line: int | None  # None for a file-wide problem (a missing class)
    message: str
    class_id: int | None = None
    segment: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        return f"{where}: {self.kind.value}: {self.message}"


def check_rankable_id(video_id: str, where: str = "") -> None:
    """Refuse a video id that cannot be ranked: the one id rule of everything that ranks
    (the service's Ingest, ``modloc infer`` on file ids, :class:`Rankings`) and of the
    submission reader and writer.

    A ranked segment id is ``'<video id>:<start>'`` in a row of the Kaggle CSV (REFERENCE
    §7), so the id must be non-empty and hold no character that would change how the row
    splits or that a CSV writer would have to quote: no whitespace (spaces separate the
    ids, line breaks the rows), no control character, no ``:`` (ends the id), no ``,``
    (separates the fields) and no ``"`` (starts a quoted field, which standard CSV readers
    run into the following rows).

    Only ranking needs this: such a video can still be localized (``modloc show``, the
    Localize service). ``where`` (e.g. ``"file.tfrecord: record 3: "``) prefixes the message.
    """
    if _RANKABLE_ID.fullmatch(video_id):
        return
    raise ValueError(f"{where}video id {video_id!r} cannot be ranked: a Kaggle segment id "
                     "'<video id>:<start>' needs a non-empty video id without whitespace, "
                     "control characters, ':', ',' or '\"' (characters that split a CSV row or "
                     "that a CSV writer would quote)")


def write_submission(
    path_or_file: PathOrFile,
    rankings: Mapping[int, Sequence[str]],
    class_ids: Iterable[int] | None = None,
    max_segments: int = MAX_SEGMENTS_PER_CLASS,
) -> None:
    """Write a Kaggle submission.

    Args:
        path_or_file: destination path, or an open text file.
        rankings: class id -> segment ids, best first. Absent classes get an empty row.
        class_ids: row order; the 1000 segment classes in ``segment_label_ids.csv`` order
            by default.
        max_segments: the longest allowed row.

    Raises:
        ValueError: for a class outside ``class_ids`` or a row that is too long, holds a
            malformed id or repeats one: nothing is cut or fixed silently. A path is then
            left untouched; an open file is left partly written.
    """
    order = _class_order(class_ids)
    outside = sorted(set(map(int, rankings)) - set(order))
    if outside:
        raise ValueError(f"rankings has classes that are not submission classes: {outside[:10]}")
    with _open_text(path_or_file, "w") as handle:
        handle.write(SUBMISSION_HEADER + "\n")
        for line, class_id in enumerate(order, start=2):
            segments = list(rankings.get(class_id, ()))
            text = " ".join(segments)
            problems = _segment_problems(segments, text, line, class_id, max_segments)
            if problems:
                raise ValueError(f"class {class_id}: {problems[0].message}")
            handle.write(f"{class_id},{text}\n")


def read_submission(
    path_or_file: PathOrFile,
    strict: bool = False,
    class_ids: Iterable[int] | None = None,
    max_segments: int = MAX_SEGMENTS_PER_CLASS,
    allow: Iterable[ProblemKind] = (),
) -> dict[int, list[str]]:
    """Read a Kaggle submission into class id -> segment ids (best first).

    A lenient read (the default) accepts anything with one reading: it raises only on
    the structural problems (malformed rows, bad or repeated class fields, a second
    header). ``strict=True`` raises on any problem ``validate_submission`` reports, with
    ``class_ids`` and ``max_segments`` as there, except the kinds in ``allow`` (e.g. the
    unknown and missing classes of a file scored over another class space).

    A full submission holds 10^8 ids: reading it takes several GB of Python strings and
    about half a minute.

    Raises:
        ValueError: listing the first problems, each with its line.
    """
    rows, problems = _scan_submission(path_or_file, class_ids, max_segments, keep_rows=True)
    allowed = set(allow)
    fatal = ([p for p in problems if p.kind not in allowed] if strict
             else [p for p in problems if p.kind in _STRUCTURAL])
    if fatal:  # one line, as a command-line error is
        shown = "; ".join(str(problem) for problem in fatal[:10])
        more = f"; ... and {len(fatal) - 10} more" if len(fatal) > 10 else ""
        raise ValueError(f"{_name(path_or_file)}: invalid submission: {shown}{more}")
    return rows


def validate_submission(
    path_or_file: PathOrFile,
    class_ids: Iterable[int] | None = None,
    max_segments: int = MAX_SEGMENTS_PER_CLASS,
    max_problems: int = 1000,
) -> list[Problem]:
    """Every problem of a submission file, in file order (missing classes last).

    Args:
        class_ids: the classes that must each have one row; the 1000 segment classes by
            default.
        max_segments: the longest allowed row.
        max_problems: the scan stops once this many problems are found.

    Returns:
        The problems; empty when the file is a valid submission.
    """
    return _scan_submission(path_or_file, class_ids, max_segments, max_problems=max_problems)[1]


def write_video_predictions(
    path_or_file: PathOrFile,
    predictions: Mapping[str, Sequence[tuple[int, float]]]
    | Iterable[tuple[str, Sequence[tuple[int, float]]]],
) -> None:
    """Write G's video-level prediction file.

    Args:
        predictions: video id -> (class id, score) pairs, as a mapping or as an iterable
            of (video id, pairs) (e.g. a generator, to stream a large file). Each line is
            written by descending score; equal scores keep the given order.

    Raises:
        ValueError: naming the video, for a repeated video id, an id containing ',' or
            whitespace, a negative class, a repeated class or a NaN score.
    """
    items = predictions.items() if isinstance(predictions, Mapping) else predictions
    seen: set[str] = set()
    with _open_text(path_or_file, "w") as handle:
        handle.write(VIDEO_PREDICTIONS_HEADER + "\n")
        for video_id, pairs in items:
            if not video_id or re.search(r"[\s,]", video_id):
                raise ValueError(f"video id {video_id!r} is empty or contains ',' or whitespace")
            if video_id in seen:
                raise ValueError(f"video {video_id!r} is given twice")
            seen.add(video_id)
            pairs = [(int(class_id), float(score)) for class_id, score in pairs]
            classes = {class_id for class_id, _ in pairs}
            if len(classes) != len(pairs) or any(class_id < 0 for class_id in classes):
                raise ValueError(f"video {video_id!r}: classes are repeated or negative")
            if any(math.isnan(score) for _, score in pairs):
                raise ValueError(f"video {video_id!r}: a score is NaN")
            ranked = sorted(pairs, key=lambda pair: -pair[1])  # stable: ties keep order
            text = " ".join(f"{class_id} {score:g}" for class_id, score in ranked)
            handle.write(f"{video_id},{text}\n")


def read_video_predictions(path_or_file: PathOrFile) -> dict[str, list[tuple[int, float]]]:
    """Read G's video-level prediction file into video id -> (class, score) pairs.

    Raises:
        ValueError: naming the line, for a missing header, a line that is not
            ``vid,c s c s ...``, an unparsable class or score, a NaN score, scores out of
            descending order, or a repeated video or class.
    """
    predictions: dict[str, list[tuple[int, float]]] = {}
    with _open_text(path_or_file, "r") as handle:
        lines = enumerate(_lines(handle), start=1)
        header = next(lines, (1, ""))[1]
        if header != VIDEO_PREDICTIONS_HEADER:
            raise ValueError(
                f"{_name(path_or_file)}: line 1: expected the header "
                f"{VIDEO_PREDICTIONS_HEADER!r}, got {header[:80]!r}"
            )
        for line, text in lines:
            try:
                video_id, pairs = _parse_video_line(text)
                if video_id in predictions:
                    raise ValueError(f"video {video_id!r} repeats an earlier line")
            except ValueError as error:
                raise ValueError(f"{_name(path_or_file)}: line {line}: {error}") from None
            predictions[video_id] = pairs
    return predictions


def _parse_video_line(text: str) -> tuple[str, list[tuple[int, float]]]:
    """One line ``vid,c s c s ...`` of the video prediction file; ValueError says why not."""
    video_id, comma, pairs_text = text.partition(",")
    if not comma or "," in pairs_text or not video_id:
        raise ValueError(f"expected 'video id,class score class score ...', got {text[:80]!r}")
    tokens = pairs_text.split(" ") if pairs_text else []
    if len(tokens) % 2:
        raise ValueError("odd number of fields: classes and scores must come in pairs")
    pairs: list[tuple[int, float]] = []
    for class_text, score_text in zip(tokens[::2], tokens[1::2], strict=True):
        try:
            class_id, score = int(class_text), float(score_text)
        except ValueError:
            raise ValueError(f"bad pair {class_text!r} {score_text!r}") from None
        if class_id < 0 or math.isnan(score):
            raise ValueError(f"bad pair {class_text!r} {score_text!r}")
        if pairs and score > pairs[-1][1]:
            raise ValueError(f"class {class_id} scores {score_text}, more than the pair before")
        pairs.append((class_id, score))
    if len({class_id for class_id, _ in pairs}) != len(pairs):
        raise ValueError("a class appears twice")
    return video_id, pairs


def _scan_submission(
    path_or_file: PathOrFile,
    class_ids: Iterable[int] | None,
    max_segments: int,
    keep_rows: bool = False,
    max_problems: int | None = None,
) -> tuple[dict[int, list[str]], list[Problem]]:
    """Parse a submission, collecting its problems and, if ``keep_rows``, its rows.

    The one reading pass of the format. Validation alone does not keep the rows: a full
    submission holds 10^8 ids, several GB as Python strings.
    """
    order = _class_order(class_ids)
    known = set(order)
    rows: dict[int, list[str]] = {}
    seen_classes: set[int] = set()
    problems: list[Problem] = []
    line = 0
    with _open_text(path_or_file, "r") as handle:
        for line, text in enumerate(_lines(handle), start=1):
            if max_problems is not None and len(problems) >= max_problems:
                return rows, problems[:max_problems]
            if text == SUBMISSION_HEADER:
                if line > 1:
                    problems.append(Problem(ProblemKind.EXTRA_HEADER, line, "a second header"))
                continue
            if line == 1:
                problems.append(
                    Problem(
                        ProblemKind.MISSING_HEADER,
                        1,
                        f"expected the header {SUBMISSION_HEADER!r}, got {text[:80]!r}",
                    )
                )
            if not text:
                problems.append(Problem(ProblemKind.BLANK_LINE, line, "an empty line"))
                continue
            if _QUOTE in text:
                # csv.reader and pandas would read a quoted field from here on, across lines
                problems.append(
                    Problem(
                        ProblemKind.QUOTED_FIELD,
                        line,
                        f"a '\"' at column {text.index(_QUOTE) + 1}: CSV readers would read a "
                        "quoted field there (no video id may hold '\"')",
                    )
                )
                continue
            class_text, comma, segments_text = text.partition(",")
            if not comma or "," in segments_text:
                problems.append(
                    Problem(
                        ProblemKind.MALFORMED_ROW,
                        line,
                        f"expected 'class,segment segment ...' with one comma, got {text[:80]!r}",
                    )
                )
                continue
            if not _CLASS_ID.fullmatch(class_text):
                problems.append(
                    Problem(ProblemKind.BAD_CLASS, line, f"class {class_text!r} is not a class id")
                )
                continue
            class_id = int(class_text)
            if class_id in seen_classes:
                problems.append(
                    Problem(
                        ProblemKind.REPEATED_CLASS,
                        line,
                        f"class {class_id} already has a row",
                        class_id=class_id,
                    )
                )
                continue
            if class_id not in known:
                problems.append(
                    Problem(
                        ProblemKind.UNKNOWN_CLASS,
                        line,
                        f"class {class_id} is not a segment class",
                        class_id=class_id,
                    )
                )
            segments = segments_text.split(" ") if segments_text else []
            problems.extend(
                _segment_problems(segments, segments_text, line, class_id, max_segments)
            )
            seen_classes.add(class_id)
            if keep_rows:
                rows[class_id] = segments
    if line == 0:
        problems.append(Problem(ProblemKind.EMPTY_FILE, None, "no header and no rows"))
    problems.extend(
        Problem(ProblemKind.MISSING_CLASS, None, f"class {c} has no row", class_id=c)
        for c in order
        if c not in seen_classes
    )
    if max_problems is not None:
        problems = problems[:max_problems]
    return rows, problems


def _segment_problems(
    segments: list[str], text: str, line: int, class_id: int, max_segments: int
) -> list[Problem]:
    """Problems of one row's segment ids; ``text`` is the ids joined by single spaces."""
    problems: list[Problem] = []
    if len(segments) > max_segments:
        problems.append(
            Problem(
                ProblemKind.TOO_MANY_SEGMENTS,
                line,
                f"{len(segments)} segments, more than {max_segments}",
                class_id=class_id,
            )
        )
    # The space count catches ids that themselves contain a space, which the row pattern
    # alone would take for two ids.
    if segments and (text.count(" ") != len(segments) - 1 or not _WELL_FORMED_ROW.fullmatch(text)):
        if "" in segments:
            problems.append(
                Problem(
                    ProblemKind.MALFORMED_ROW,
                    line,
                    "an empty segment id (a doubled, leading or trailing space)",
                    class_id=class_id,
                )
            )
        for segment in segments:
            reason = _segment_id_error(segment) if segment else None
            if reason:
                problems.append(
                    Problem(
                        ProblemKind.BAD_SEGMENT,
                        line,
                        f"segment {segment[:80]!r}: {reason}",
                        class_id=class_id,
                        segment=segment,
                    )
                )
    if len(set(segments)) != len(segments):
        seen: set[str] = set()
        reported: set[str] = set()
        for segment in segments:
            if segment and segment in seen and segment not in reported:
                reported.add(segment)
                problems.append(
                    Problem(
                        ProblemKind.DUPLICATE_SEGMENT,
                        line,
                        f"segment {segment!r} appears more than once",
                        class_id=class_id,
                        segment=segment,
                    )
                )
            seen.add(segment)
    return problems


def _segment_id_error(segment: str) -> str | None:
    """Why ``segment`` is not a valid segment id, or None if it is."""
    match = _SEGMENT_ID.fullmatch(segment)
    if match is None:
        return "not '<video id>:<start seconds>'"
    if int(match.group(2)) % 5:
        return "the start is not a multiple of 5"
    return None


def _class_order(class_ids: Iterable[int] | None) -> list[int]:
    """The submission's class rows in order: the 1000 segment classes by default."""
    order = [int(c) for c in (default_segment_class_ids() if class_ids is None else class_ids)]
    if len(set(order)) != len(order):
        raise ValueError("class_ids has repeated classes")
    return order


def _lines(handle: TextIO) -> Iterator[str]:
    """The lines of ``handle`` without their line ending ('\\n' or '\\r\\n')."""
    for text in handle:
        yield text.rstrip("\n").removesuffix("\r")


@contextlib.contextmanager
def _open_text(path_or_file: PathOrFile, mode: str) -> Iterator[TextIO]:
    """Open a path as UTF-8 text ('\\n' line endings); pass an open file through.

    A path opened for writing is written whole or not at all: the text goes to a sibling
    ``.partial`` file that replaces the destination only once the writer finishes, so a
    writer that raises halfway never leaves a truncated file under the final name.
    """
    if not isinstance(path_or_file, (str, os.PathLike)):
        yield path_or_file
        return
    if mode == "r":
        with open(path_or_file, encoding="utf-8") as handle:
            try:
                yield handle
            except UnicodeDecodeError as error:
                raise ValueError(f"{os.fspath(path_or_file)}: not UTF-8 text ({error.reason} at "
                                 f"byte {error.start}): expected a CSV file") from None
        return
    partial = f"{os.fspath(path_or_file)}.partial"
    try:
        with open(partial, "w", encoding="utf-8", newline="\n") as handle:
            yield handle
        os.replace(partial, path_or_file)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _name(path_or_file: PathOrFile) -> str:
    """How error messages name a file."""
    if isinstance(path_or_file, (str, os.PathLike)):
        return os.fspath(path_or_file)
    return str(getattr(path_or_file, "name", "<stream>"))
