"""Find the labelled image files of a dataset folder, in one of two layouts.

(a) The Kaggle archive `maparla/prado-museum-pictures`: `prado.csv` in the root and the images
    somewhere below it (the archive may nest them as `images/` or `images/images/`, see
    ../shared/reference/report-facts.md), each matched to its csv row by the last path part of
    `work_image_url`. The five painters of the report are selected by their exact `author` strings.
(b) Folder-per-class: `root/<class>/<image>`; the classes are the sorted subfolder names.

Only paths and labels are produced here; decoding happens once, in `cache.py`.
"""

from __future__ import annotations

import csv
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import numpy as np

CLASSES: tuple[str, ...] = ("goya", "bayeu", "haes", "pizarro", "ribera")

# Exact `author` values in prado.csv (report-facts.md, "Dataset"); class order = report order.
PRADO_AUTHORS: dict[str, str] = {
    "goya": "Goya y Lucientes, Francisco de",
    "bayeu": "Bayeu y Subías, Francisco",
    "haes": "Haes, Carlos de",
    "pizarro": "Pizarro y Librado, Cecilio",
    "ribera": "Ribera y Fieve, Carlos Luis de",
}

PRADO_CSV = "prado.csv"
PRADO_COLUMNS = ("author", "work_image_url")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# prado.csv holds long free-text columns (work_description, technical sheets); the csv module's
# default 128 KiB field limit is a guard against runaway parsing, not a property of the file.
_CSV_FIELD_LIMIT = 16 * 1024 * 1024


class DataError(ValueError):
    """The dataset folder is not usable; the message names the path and what is expected."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class SampleSet:
    """The labelled files of one dataset folder, plus files that were found but left out."""

    samples: list[Sample]
    classes: list[str]
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    layout: str = "folder"  # "kaggle" or "folder"

    @property
    def labels(self) -> np.ndarray:
        return np.array([sample.label for sample in self.samples], dtype=np.int64)

    def counts(self) -> list[int]:
        """Number of samples per class, in class order."""
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()


def find_samples(root: Path) -> SampleSet:
    """The labelled images below `root`, detecting the Kaggle or folder-per-class layout."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a directory")
    if not any(root.iterdir()):
        raise DataError(
            f"data folder {root} is empty; expected either {PRADO_CSV} with the Kaggle image folder "
            "(maparla/prado-museum-pictures) or one subfolder of images per class"
        )
    if (root / PRADO_CSV).is_file():
        return _find_kaggle_samples(root)
    return _find_folder_samples(root)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _find_kaggle_samples(root: Path) -> SampleSet:
    csv_path = root / PRADO_CSV
    selected = [(line, label, row["work_image_url"]) for line, label, row in read_painter_rows(csv_path)]
    if not selected:
        authors = "; ".join(PRADO_AUTHORS.values())
        raise DataError(f"{csv_path} lists none of the five painters (author column): {authors}")

    images = _index_images_by_name(root)
    if not images:
        raise DataError(
            f"{csv_path} found, but no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) below {root}; "
            "expected the archive's image folder (e.g. images/<name>.jpg) or run "
            "`python -m prado_dist.data fetch`"
        )
    # Missing files are reported where the archive would have them (the folder most images are in).
    image_dir = Counter(path.parent for path in images.values()).most_common(1)[0][0]

    samples: list[Sample] = []
    rejected: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for line, label, url in selected:
        name = image_name_from_url(url)
        if not name:
            rejected.append((csv_path, f"line {line}: empty or unusable work_image_url {url!r}"))
        elif name in seen:
            rejected.append((images.get(name, image_dir / name), f"line {line}: image listed twice"))
        elif name not in images:
            reason = f"listed in {PRADO_CSV} (line {line}) but not found below {root}"
            rejected.append((image_dir / name, reason))
        else:
            seen.add(name)
            samples.append(Sample(images[name], label))

    sample_set = SampleSet(samples, list(CLASSES), rejected, layout="kaggle")
    _require_every_class(sample_set, root)
    return sample_set


def image_name_from_url(url: str) -> str:
    """The file name a `work_image_url` is stored under: its last path part, without query."""
    return unquote(PurePosixPath(urlsplit(url.strip()).path).name)


def read_painter_rows(csv_path: Path) -> list[tuple[int, int, dict[str, str]]]:
    """(csv line, class label, row) of every row whose `author` is one of the five painters' exact
    author strings; lines are numbered as an editor shows them (header = line 1)."""
    class_of_author = {normalise_author(author): label for label, author in enumerate(PRADO_AUTHORS.values())}
    # prado.csv has long free-text columns; the csv module's 128 KiB default field limit is a guard
    # against runaway parsing, not a property of the file.
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [column for column in PRADO_COLUMNS if column not in columns]
        if missing:
            raise DataError(
                f"{csv_path} lacks the column(s) {missing}; expected the Kaggle prado.csv with "
                f"{list(PRADO_COLUMNS)} (found {columns[:10]}{' ...' if len(columns) > 10 else ''})"
            )
        rows = [(reader.line_num, {key: value or "" for key, value in row.items()}) for row in reader]
    return [
        (line, class_of_author[normalise_author(row["author"])], row)
        for line, row in rows
        if normalise_author(row["author"]) in class_of_author
    ]


def normalise_author(author: str) -> str:
    # "Subías" may be stored composed or decomposed; both are the same exact author string.
    return unicodedata.normalize("NFC", author.strip())


def _index_images_by_name(root: Path) -> dict[str, Path]:
    """Every image file below `root` by file name; sorted walk, so the first found is stable."""
    images: dict[str, Path] = {}
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            path = Path(directory) / name
            if is_image_file(path):
                images.setdefault(name, path)
    return images


def _find_folder_samples(root: Path) -> SampleSet:
    class_dirs = sorted(
        (path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")),
        key=lambda path: path.name,
    )
    if not class_dirs:
        raise DataError(
            f"data folder {root} has no {PRADO_CSV} and no class subfolders; expected "
            f"{root}/<class>/<image> (one folder per painter) or the Kaggle archive with {PRADO_CSV}"
        )
    samples: list[Sample] = []
    rejected: list[tuple[Path, str]] = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith("."):
                continue
            if is_image_file(path) and path.is_file():
                samples.append(Sample(path, label))
            else:
                rejected.append((path, f"not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})"))
    sample_set = SampleSet(samples, [path.name for path in class_dirs], rejected, layout="folder")
    _require_every_class(sample_set, root)
    return sample_set


def _require_every_class(sample_set: SampleSet, root: Path) -> None:
    counts = sample_set.counts()
    empty = [name for name, count in zip(sample_set.classes, counts, strict=True) if count == 0]
    if empty:
        found = dict(zip(sample_set.classes, counts, strict=True))
        raise DataError(f"no images for class(es) {empty} in {root} ({sample_set.layout} layout); found {found}")
