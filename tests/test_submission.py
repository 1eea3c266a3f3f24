"""Tests of modloc.engine.base.submission: the Kaggle segment CSV and G's video prediction file."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modloc.engine.base.submission import (
    SUBMISSION_HEADER,
    ProblemKind,
    check_rankable_id,
    read_submission,
    read_video_predictions,
    validate_submission,
    write_submission,
    write_video_predictions,
)
from modloc.engine.base.vocab import default_segment_class_ids

CLASSES = [3, 7]  # a two-class vocabulary keeps the hand-written files short


def written(rankings, class_ids=CLASSES, **kwargs) -> str:
    buffer = io.StringIO()
    write_submission(buffer, rankings, class_ids, **kwargs)
    return buffer.getvalue()


# --- Kaggle submission: writer and reader --------------------------------------------------


def test_write_format_and_empty_rows():
    text = written({7: ["abcd:0", "efgh:15"]}, class_ids=[7, 3])
    assert text == "Class,Segments\n7,abcd:0 efgh:15\n3,\n"
    assert read_submission(io.StringIO(text), strict=True, class_ids=[7, 3]) == {
        7: ["abcd:0", "efgh:15"],
        3: [],
    }


def test_default_row_order_is_segment_label_ids(tmp_path):
    class_ids = default_segment_class_ids().tolist()
    path = tmp_path / "submission.csv"
    write_submission(path, {class_ids[5]: ["v:0"]})
    lines = path.read_text().splitlines()
    assert lines[0] == SUBMISSION_HEADER
    assert [int(line.split(",")[0]) for line in lines[1:]] == class_ids
    assert validate_submission(path) == []
    rows = read_submission(path, strict=True)
    assert list(rows) == class_ids and rows[class_ids[5]] == ["v:0"]


segment_ids = st.builds(
    "{}:{}".format,
    st.text("abcXYZ019_-", min_size=1, max_size=6),
    st.integers(0, 400).map(lambda i: 5 * i),
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from(CLASSES), st.lists(segment_ids, unique=True, max_size=20)))
def test_submission_round_trip(rankings):
    text = written(rankings)
    expected = {c: rankings.get(c, []) for c in CLASSES}
    assert read_submission(io.StringIO(text), strict=True, class_ids=CLASSES) == expected


@pytest.mark.parametrize("length", [99_999, 100_000, 100_001])
def test_kaggle_row_limit_is_enforced_not_cut(length):
    row = [f"v{i}:0" for i in range(length)]
    if length <= 100_000:
        assert (
            read_submission(io.StringIO(written({3: row})), strict=True, class_ids=CLASSES)[3]
            == row
        )
    else:
        with pytest.raises(ValueError, match="100001 segments, more than 100000"):
            written({3: row})


@pytest.mark.parametrize(
    ("rankings", "message"),
    [
        ({4: ["a:0"]}, "not submission classes"),
        ({3: ["a:0", "a:0"]}, "more than once"),
        ({3: ["a b:0"]}, "segment 'a b:0'"),  # a space would split the id in two
        ({3: ["a,b:0"]}, "segment 'a,b:0'"),
        ({3: ["a:3"]}, "multiple of 5"),
        ({3: ["a:0", ""]}, "empty segment id"),
        ({3: [""]}, "empty segment id"),  # would read back as an empty row
        ({3: ["a:0 b:5"]}, "segment 'a:0 b:5'"),  # would read back as two ids
        ({3: ['"a:0', "b:5"]}, """segment '"a:0'"""),  # a quoted field to CSV readers
    ],
)
def test_writer_refuses_what_the_validator_would_flag(rankings, message):
    with pytest.raises(ValueError, match=message):
        written(rankings)


def test_a_failed_write_leaves_the_destination_untouched(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("previous\n")
    with pytest.raises(ValueError, match="class 7"):
        write_submission(path, {3: ["a:0"], 7: ["a:0", "a:0"]}, CLASSES)
    assert path.read_text() == "previous\n"
    assert list(tmp_path.iterdir()) == [path]


def test_lenient_read_accepts_content_problems_but_not_structural_ones():
    # No header, an unknown class, a bad id and a missing class: one reading exists.
    assert read_submission(io.StringIO("3,a:1\n4,\n"), class_ids=CLASSES) == {3: ["a:1"], 4: []}
    with pytest.raises(ValueError, match=r"line 3: repeated class"):
        read_submission(io.StringIO("Class,Segments\n3,a:0\n3,b:0\n"), class_ids=CLASSES)
    with pytest.raises(ValueError, match=r"line 2: unknown class[^\n]*; line 3: bad segment"):
        read_submission(
            io.StringIO("Class,Segments\n4,\n3,a:1\n7,\n"), strict=True, class_ids=CLASSES
        )


def test_a_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "records.tfrecord"
    path.write_bytes(b"\xd7\x01\x00\x00\x00\x00\x00\x00")
    for read in (lambda: read_submission(path, class_ids=CLASSES), lambda: read_video_predictions(path)):
        with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text .* byte 0\): expected a CSV file"):
            read()


def test_video_predictions_of_another_split_are_refused(tmp_path, tiny_dataset):
    from modloc.engine.base.scoring import evaluate_video_predictions

    predictions = tmp_path / "predictions.csv"
    write_video_predictions(predictions, {"not-in-the-split": [(1, 0.5)]})
    with pytest.raises(ValueError, match=r"predictions.csv covers 0 of the \d+ labelled videos .* "
                                         r"\(1 videos predicted\): are they of the same split\?"):
        evaluate_video_predictions(str(predictions), str(tiny_dataset / "train" / "*.tfrecord"))


def test_a_quoted_field_is_refused_even_by_a_lenient_read():
    with pytest.raises(ValueError, match=r"line 2: quoted field: a '\"' at column 3"):
        read_submission(io.StringIO(H + '3,"a:0 b:5\n7,c:0\n'), class_ids=CLASSES)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=12))
def test_every_rankable_id_is_one_that_csv_writers_leave_unquoted(video_id):
    """The id rule refuses exactly what would change a CSV reader's fields: what it lets
    through, Python's csv module writes verbatim and reads back as the same rows."""
    import csv

    try:
        check_rankable_id(video_id)
    except ValueError:
        return
    row = f"{video_id}:0 {video_id}x:5"
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([3, row])
    assert buffer.getvalue() == f"3,{row}\n"  # nothing quoted
    text = written({3: row.split(" ")})
    assert list(csv.reader(io.StringIO(text))) == [["Class", "Segments"], ["3", row], ["7", ""]]
    assert read_submission(io.StringIO(text), strict=True, class_ids=CLASSES) == {3: row.split(" "), 7: []}


@pytest.mark.parametrize("video_id", ["", "a b", "a:b", "a,b", 'a"b', "a\x00b", "a\x85b", "a\u2028b"])
def test_the_id_rule_refuses_what_splits_or_quotes_a_csv_row(video_id):
    with pytest.raises(ValueError, match="cannot be ranked"):
        check_rankable_id(video_id)


def test_crlf_line_endings_are_read():
    text = "Class,Segments\r\n3,a:0 b:5\r\n7,\r\n"
    assert validate_submission(io.StringIO(text), class_ids=CLASSES) == []
    assert read_submission(io.StringIO(text), class_ids=CLASSES) == {3: ["a:0", "b:5"], 7: []}


# --- Kaggle submission: validator ----------------------------------------------------------

H = "Class,Segments\n"

MALFORMED = [
    # (file text, expected problems as (kind, line, class, segment)); CLASSES = [3, 7]
    (
        "",
        [(ProblemKind.EMPTY_FILE, None, None, None)]
        + [(ProblemKind.MISSING_CLASS, None, c, None) for c in CLASSES],
    ),
    ("3,a:0\n7,\n", [(ProblemKind.MISSING_HEADER, 1, None, None)]),
    (H + "3,a:0\nClass,Segments\n7,\n", [(ProblemKind.EXTRA_HEADER, 3, None, None)]),
    (H + "3,a:0\n\n7,\n", [(ProblemKind.BLANK_LINE, 3, None, None)]),
    (
        H + "3 a:0\n7,\n",
        [(ProblemKind.MALFORMED_ROW, 2, None, None), (ProblemKind.MISSING_CLASS, None, 3, None)],
    ),
    (
        H + "3,a:0,b:5\n7,\n",
        [(ProblemKind.MALFORMED_ROW, 2, None, None), (ProblemKind.MISSING_CLASS, None, 3, None)],
    ),
    (H + "3,a:0  b:5\n7,\n", [(ProblemKind.MALFORMED_ROW, 2, 3, None)]),
    (H + "3,a:0 \n7,\n", [(ProblemKind.MALFORMED_ROW, 2, 3, None)]),
    (H + "x,a:0\n3,\n7,\n", [(ProblemKind.BAD_CLASS, 2, None, None)]),
    (H + "-3,a:0\n3,\n7,\n", [(ProblemKind.BAD_CLASS, 2, None, None)]),
    (H + "3,\n4,a:0\n7,\n", [(ProblemKind.UNKNOWN_CLASS, 3, 4, None)]),
    (H + "3,a:0\n7,\n3,b:5\n", [(ProblemKind.REPEATED_CLASS, 4, 3, None)]),
    (H + "3,a:0\n", [(ProblemKind.MISSING_CLASS, None, 7, None)]),
    (H + "3,a0\n7,\n", [(ProblemKind.BAD_SEGMENT, 2, 3, "a0")]),
    (H + "3,a:0 b:7\n7,\n", [(ProblemKind.BAD_SEGMENT, 2, 3, "b:7")]),
    (H + "3,\n7,a:05\n", [(ProblemKind.BAD_SEGMENT, 3, 7, "a:05")]),
    (H + "3,a:-5\n7,\n", [(ProblemKind.BAD_SEGMENT, 2, 3, "a:-5")]),
    (H + "3,:5\n7,\n", [(ProblemKind.BAD_SEGMENT, 2, 3, ":5")]),
    (H + "3,a:0 a:0 a:0\n7,\n", [(ProblemKind.DUPLICATE_SEGMENT, 2, 3, "a:0")]),
    (H + "3,\n7,a:0 a:5 a:10 a:15\n", [(ProblemKind.TOO_MANY_SEGMENTS, 3, 7, None)]),
    # csv.reader would read '"a:0 …' as a quoted field running into the next lines
    (
        H + '3,"a:0 b:5\n7,c:0\n',
        [(ProblemKind.QUOTED_FIELD, 2, None, None), (ProblemKind.MISSING_CLASS, None, 3, None)],
    ),
    (H + '3,a:0\n7,b"c:0\n', [(ProblemKind.QUOTED_FIELD, 3, None, None),
                               (ProblemKind.MISSING_CLASS, None, 7, None)]),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_validator_reports_kind_line_class_and_segment(text, expected):
    problems = validate_submission(io.StringIO(text), class_ids=CLASSES, max_segments=3)
    assert [(p.kind, p.line, p.class_id, p.segment) for p in problems] == expected
    assert all(p.message for p in problems)
    with pytest.raises(ValueError, match=expected[0][0].value):
        read_submission(io.StringIO(text), strict=True, class_ids=CLASSES, max_segments=3)


def test_validator_stops_at_max_problems():
    text = H + "".join(f"x{i},\n" for i in range(50))
    problems = validate_submission(io.StringIO(text), class_ids=CLASSES, max_problems=5)
    assert [p.line for p in problems] == [2, 3, 4, 5, 6]
    assert str(problems[0]) == "line 2: bad class: class 'x0' is not a class id"


# --- video prediction file -----------------------------------------------------------------


def test_video_predictions_round_trip_sorted_by_score(tmp_path):
    predictions = {
        "abcd": [(4, 0.5), (12, 0.913), (7, 0.5)],  # ties keep the given order: 4 then 7
        "efgh": [],
        "ijkl": [(3861, 1e-05)],
    }
    path = tmp_path / "predictions.csv"
    write_video_predictions(path, predictions)
    assert path.read_text() == (
        "VideoId,LabelConfidencePairs\nabcd,12 0.913 4 0.5 7 0.5\nefgh,\nijkl,3861 1e-05\n"
    )
    assert read_video_predictions(path) == {
        "abcd": [(12, 0.913), (4, 0.5), (7, 0.5)],
        "efgh": [],
        "ijkl": [(3861, 1e-05)],
    }


def test_video_scores_are_written_as_g_does():
    buffer = io.StringIO()
    score = 0.123456789
    write_video_predictions(buffer, iter([("v", [(2, score)])]))  # an iterable streams too
    # G formats with "%i %g"; the percent format is the point of the comparison.
    assert buffer.getvalue().splitlines()[1] == "v," + "%i %g" % (2, score)  # noqa: UP031
    assert read_video_predictions(io.StringIO(buffer.getvalue()))["v"] == [(2, 0.123457)]


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("", 1, "expected the header"),
        ("VideoId,Labels\n", 1, "expected the header"),
        ("VideoId,LabelConfidencePairs\nabcd 1 0.5\n", 2, "expected 'video id,"),
        ("VideoId,LabelConfidencePairs\nabcd,1 0.5,2\n", 2, "expected 'video id,"),
        ("VideoId,LabelConfidencePairs\nabcd,1 0.5\nefgh,1\n", 3, "odd number"),
        ("VideoId,LabelConfidencePairs\nabcd,x 0.5\n", 2, "bad pair 'x' '0.5'"),
        ("VideoId,LabelConfidencePairs\nabcd,1 high\n", 2, "bad pair"),
        ("VideoId,LabelConfidencePairs\nabcd,1 nan\n", 2, "bad pair"),
        ("VideoId,LabelConfidencePairs\nabcd,1 0.2 2 0.5\n", 2, "more than the pair before"),
        ("VideoId,LabelConfidencePairs\nabcd,1 0.5 1 0.2\n", 2, "a class appears twice"),
        ("VideoId,LabelConfidencePairs\nabcd,1 0.5\nabcd,\n", 3, "repeats an earlier line"),
        ("VideoId,LabelConfidencePairs\nabcd,1 0.5\n\n", 3, "expected 'video id,"),
    ],
)
def test_video_reader_errors_name_the_line(body, line, message):
    with pytest.raises(ValueError, match=rf"line {line}: .*{message}"):
        read_video_predictions(io.StringIO(body))


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        ([("a", [(1, 0.5)]), ("a", [])], "given twice"),
        ([("a,b", [])], "contains ','"),
        ([("a", [(1, 0.5), (1, 0.2)])], "repeated or negative"),
        ([("a", [(-1, 0.5)])], "repeated or negative"),
        ([("a", [(1, float("nan"))])], "NaN"),
    ],
)
def test_video_writer_errors(predictions, message):
    with pytest.raises(ValueError, match=message):
        write_video_predictions(io.StringIO(), predictions)


@pytest.mark.parametrize("video_id", ["abc", "Ab-9_x.y", "é"])
def test_a_rankable_video_id_passes(video_id):
    check_rankable_id(video_id)


@pytest.mark.parametrize("video_id", ["", "a b", "a\tb", "a\nb", "a:b", "a,b", " "])
def test_an_id_a_segment_id_cannot_carry_is_refused_naming_where(video_id):
    with pytest.raises(ValueError, match=rf"^f\.tfrecord: record 3: video id {re.escape(repr(video_id))} "
                                         r"cannot be ranked"):
        check_rankable_id(video_id, "f.tfrecord: record 3: ")


def test_video_predictions_take_class_0_and_refuse_negative_classes():
    out = io.StringIO()
    write_video_predictions(out, {"v": [(0, 0.5), (7, 0.25)]})
    assert read_video_predictions(io.StringIO(out.getvalue())) == {"v": [(0, 0.5), (7, 0.25)]}
    with pytest.raises(ValueError, match="'v': classes are repeated or negative"):
        write_video_predictions(io.StringIO(), {"v": [(-1, 0.5)]})


def test_classes_outside_the_submission_are_named_ten_at_most():
    with pytest.raises(ValueError, match=r"not submission classes: \[100, 101, 102, 103, 104, 105, "
                                         r"106, 107, 108, 109\]$"):
        write_submission(io.StringIO(), {c: ["a:0"] for c in range(100, 111)}, class_ids=[3])
