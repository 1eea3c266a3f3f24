"""YouTube-8M class vocabularies.

Two lists matter (REFERENCE §1.4):

- the 3862-class video vocabulary (``vocabulary.csv``): its rows are sorted by
  ``TrainVideoCount``, not by ``Index``, so a class is always looked up by the ``Index``
  column, never by row number;
- the 1000 segment-rated classes (``segment_label_ids.csv``): indices into the 3862
  vocabulary, in the file's own (nearly, not strictly, ascending) order, which is also the
  row order of a Kaggle submission.

Copies of the real files ship inside the package (``engine/data``) so that nothing here
needs the dataset or the network.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

NUM_VIDEO_CLASSES = 3862
NUM_SEGMENT_CLASSES = 1000


def data_path(name: str) -> Path:
    """Path of a file shipped in ``engine/data`` (vocabularies, PCA eigenvalues)."""
    return Path(str(resources.files("modloc.engine.base") / "data" / name))


@dataclass(frozen=True)
class VideoClass:
    index: int
    name: str
    knowledge_graph_id: str
    train_video_count: int
    vertical: str


@dataclass(frozen=True)
class Vocabulary:
    """The 3862-class vocabulary, indexed by the ``Index`` column."""

    classes: dict[int, VideoClass]

    def __len__(self) -> int:
        return len(self.classes)

    def __contains__(self, index: object) -> bool:
        return index in self.classes

    def name(self, index: int) -> str:
        """Display name of a class; the Knowledge Graph id where the name is empty."""
        entry = self.classes.get(int(index))
        if entry is None:
            return f"class {index}"
        return entry.name or entry.knowledge_graph_id


def read_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read ``vocabulary.csv`` (the shipped copy by default)."""
    path = Path(path) if path is not None else data_path("vocabulary.csv")
    classes: dict[int, VideoClass] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                index = int(row["Index"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}: row {line_number}: bad Index {row.get('Index')!r}") from error
            if index in classes:
                raise ValueError(f"{path}: row {line_number}: duplicate Index {index}")
            classes[index] = VideoClass(
                index=index,
                name=row.get("Name") or "",
                knowledge_graph_id=row.get("KnowledgeGraphId") or "",
                train_video_count=int(row.get("TrainVideoCount") or 0),
                vertical=row.get("Vertical1") or "",
            )
    return Vocabulary(classes)


def read_segment_class_ids(path: str | Path | None = None) -> np.ndarray:
    """The 1000 segment class ids, int64, in file (= submission row) order."""
    path = Path(path) if path is not None else data_path("segment_label_ids.csv")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    if not lines or lines[0] != "Index":
        raise ValueError(f"{path}: expected a header line 'Index'")
    ids = []
    for line_number, text in enumerate(lines[1:], start=2):
        try:
            ids.append(int(text))
        except ValueError as error:
            raise ValueError(f"{path}: line {line_number}: not a class id: {text!r}") from error
    result = np.asarray(ids, dtype=np.int64)
    if len(np.unique(result)) != len(result):
        raise ValueError(f"{path}: duplicate class ids")
    return result


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    return read_vocabulary()


@functools.lru_cache(maxsize=1)
def default_segment_class_ids() -> np.ndarray:
    ids = read_segment_class_ids()
    ids.setflags(write=False)
    return ids


# --- class spaces -----------------------------------------------------------------


class ClassSpace:
    """The classes a model outputs, in output order, as ids of the 3862-class vocabulary.

    ``ClassSpace(None)`` is the identity over the whole vocabulary; ``ClassSpace(ids)`` with
    e.g. the 1000 segment class ids (:func:`modloc.engine.base.vocab.default_segment_class_ids`) makes
    output ``j`` the vocabulary class ``ids[j]``.
    """

    def __init__(self, class_ids: Sequence[int] | np.ndarray | None = None):
        if class_ids is None:
            ids = np.arange(NUM_VIDEO_CLASSES, dtype=np.int64)
        else:
            ids = np.asarray(class_ids)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"class_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
            ids = ids.astype(np.int64)
            outside = ids[(ids < 0) | (ids >= NUM_VIDEO_CLASSES)]
            if len(outside):
                raise ValueError(
                    f"class_ids outside the {NUM_VIDEO_CLASSES}-class vocabulary: {outside[:10].tolist()}"
                )
            if len(np.unique(ids)) != len(ids):
                raise ValueError("class_ids has repeated ids")
        ids.setflags(write=False)
        self.class_ids = ids
        # vocabulary id -> output position, -1 for ids outside the space
        self._position = np.full(NUM_VIDEO_CLASSES, -1, dtype=np.int64)
        self._position[ids] = np.arange(len(ids))

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def positions(self, vocabulary_ids: np.ndarray) -> np.ndarray:
        """``(n,)`` vocabulary ids → ``(n,)`` int64 output positions, -1 outside the space.

        Ids outside the vocabulary (negative, >= 3862) are outside the space too: a record
        with such a label is dropped label by label, not rejected.
        """
        ids = np.asarray(vocabulary_ids, dtype=np.int64)
        result = np.full(ids.shape, -1, dtype=np.int64)
        known = (ids >= 0) & (ids < NUM_VIDEO_CLASSES)
        result[known] = self._position[ids[known]]
        return result

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassSpace) and np.array_equal(self.class_ids, other.class_ids)

    def __hash__(self) -> int:
        return hash(self.class_ids.tobytes())

    def __repr__(self) -> str:
        return f"ClassSpace({self.num_classes} classes)"


def as_class_space(class_ids: ClassSpace | Sequence[int] | np.ndarray | None) -> ClassSpace:
    """``class_ids`` as a :class:`ClassSpace` (itself when it is one)."""
    return class_ids if isinstance(class_ids, ClassSpace) else ClassSpace(class_ids)
