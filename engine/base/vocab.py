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
