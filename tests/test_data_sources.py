"""Finding labelled files (Kaggle and folder-per-class layouts) and the stratified split."""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prado_dist.data.sources import CLASSES, PRADO_AUTHORS, DataError, find_samples
from prado_dist.data.split import stratified_split

URL = "https://content3.cdnprado.net/imagenes/Documentos/imgsem/aa/bb/{name}"


def write_image(path: Path, size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = (90, 30, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_prado_csv(path: Path, rows: list[dict[str, str]]) -> None:
    # The real file has ~30 columns; a few extra ones make sure only the two needed are used.
    columns = ["work_url", "work_image_url", "author", "work_title"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({"work_url": "", "work_title": "t", **row})


def kaggle_dataset(root: Path, per_class: int = 3, image_dir: str = "images/images") -> dict[str, int]:
    """A Kaggle-layout folder; returns file name -> expected label."""
    rows, expected = [], {}
    for label, painter in enumerate(CLASSES):
        for index in range(per_class):
            name = f"{painter}-{index:02d}.jpg"
            write_image(root / image_dir / name)
            rows.append({"work_image_url": URL.format(name=name), "author": PRADO_AUTHORS[painter]})
            expected[name] = label
    # Another artist's work, present on disk, must be ignored.
    write_image(root / image_dir / "velazquez.jpg")
    rows.append({"work_image_url": URL.format(name="velazquez.jpg"), "author": "Velázquez, Diego"})
    write_prado_csv(root / "prado.csv", rows)
    return expected


def test_kaggle_layout_nested_image_folder(tmp_path: Path) -> None:
    expected = kaggle_dataset(tmp_path)
    found = find_samples(tmp_path)
    assert found.layout == "kaggle"
    assert found.classes == list(CLASSES)
    assert {sample.path.name: sample.label for sample in found.samples} == expected
    assert all(sample.path.parent == tmp_path / "images" / "images" for sample in found.samples)
    assert found.rejected == []
    assert found.counts() == [3] * 5


def test_kaggle_missing_file_is_rejected_not_fatal(tmp_path: Path) -> None:
    kaggle_dataset(tmp_path, image_dir="images")
    (tmp_path / "images" / "goya-01.jpg").unlink()
    found = find_samples(tmp_path)
    assert found.counts() == [2, 3, 3, 3, 3]
    [(path, reason)] = found.rejected
    assert path == tmp_path / "images" / "goya-01.jpg"
    assert "not found" in reason


def test_kaggle_author_match_is_exact_but_unicode_normalised(tmp_path: Path) -> None:
    kaggle_dataset(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "prado.csv", encoding="utf-8")))
    for row in rows:
        if row["author"] == PRADO_AUTHORS["bayeu"]:
            row["author"] = unicodedata.normalize("NFD", row["author"])  # "Subías", decomposed
        if row["work_image_url"].endswith("haes-00.jpg"):
            row["author"] = "Haes, Carlos"  # not the exact string: not selected
        if row["work_image_url"].endswith("ribera-00.jpg"):
            row["work_image_url"] += "?v=2"  # the file name is the last path part, without query
    write_prado_csv(tmp_path / "prado.csv", rows)
    assert find_samples(tmp_path).counts() == [3, 3, 2, 3, 3]


def test_folder_layout(tmp_path: Path) -> None:
    for painter, count in (("titian", 2), ("rembrandt", 3)):
        for index in range(count):
            write_image(tmp_path / painter / f"{index}.JPG")
    write_image(tmp_path / "titian" / "extra.webp")
    (tmp_path / "titian" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "titian" / ".hidden.jpg")
    (tmp_path / ".git").mkdir()
    found = find_samples(tmp_path)
    assert found.layout == "folder"
    assert found.classes == ["rembrandt", "titian"]  # sorted subfolder names
    assert found.counts() == [3, 3]
    assert [(path.name, "not an image" in reason) for path, reason in found.rejected] == [("notes.txt", True)]
    assert found.labels.dtype == np.int64


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.write_text("x"), "not a directory"),
        (lambda root: root.mkdir(), "is empty"),
        (lambda root: write_image(root / "loose.jpg"), "no class subfolders"),
        (
            lambda root: (write_image(root / "a" / "1.jpg"), (root / "b").mkdir()),
            r"no images for class\(es\) \['b'\]",
        ),
    ],
    ids=["missing", "file", "empty", "no-subfolders", "empty-class"],
)
def test_folder_errors(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message) as raised:
        find_samples(root)
    assert str(root) in str(raised.value)


def test_kaggle_errors(tmp_path: Path) -> None:
    (tmp_path / "prado.csv").write_text("author,title\nGoya y Lucientes, Francisco de,x\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['work_image_url'\]"):
        find_samples(tmp_path)

    write_prado_csv(tmp_path / "prado.csv", [{"work_image_url": URL.format(name="a.jpg"), "author": "Velázquez"}])
    with pytest.raises(DataError, match="none of the five painters"):
        find_samples(tmp_path)

    kaggle_dataset(tmp_path / "no-images")
    for path in (tmp_path / "no-images" / "images" / "images").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="no image files"):
        find_samples(tmp_path / "no-images")

    kaggle_dataset(tmp_path / "no-ribera")
    for path in (tmp_path / "no-ribera" / "images" / "images").glob("ribera-*"):
        path.unlink()
    with pytest.raises(DataError, match=r"no images for class\(es\) \['ribera'\]"):
        find_samples(tmp_path / "no-ribera")


# --- split ------------------------------------------------------------------------------------

REPORT_COUNTS = (1080, 446, 326, 290, 222)


def report_labels() -> np.ndarray:
    return np.repeat(np.arange(5), REPORT_COUNTS)


def test_split_partitions_and_stratifies() -> None:
    labels = np.random.default_rng(0).permutation(report_labels())
    splits = stratified_split(labels, test_fraction=0.2, val_fraction=0.2, seed=42)
    assert list(splits) == ["train", "val", "test"]
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))  # disjoint, covering
    assert all(np.array_equal(part, np.sort(part)) and part.dtype == np.int64 for part in splits.values())
    test_counts = np.bincount(labels[splits["test"]], minlength=5)
    val_counts = np.bincount(labels[splits["val"]], minlength=5)
    assert test_counts.tolist() == [216, 89, 65, 58, 44]  # 20% per class; 472 in all, as in the report
    rest = np.array(REPORT_COUNTS) - test_counts
    assert np.all(np.abs(val_counts - 0.2 * rest) <= 0.5)  # val is a fraction of the non-test rest


def test_split_is_seeded() -> None:
    labels = report_labels()
    first, again = stratified_split(labels, seed=42), stratified_split(labels, seed=42)
    other = stratified_split(labels, seed=7)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["test"], other["test"])


def test_split_keeps_one_per_split_for_tiny_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    splits = stratified_split(labels, test_fraction=0.05, val_fraction=0.05, seed=0)
    for part in splits.values():
        assert set(labels[part].tolist()) == {0, 1}


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="class 1 has 2 image"):
        stratified_split(np.array([0, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(report_labels(), test_fraction=1.0)
    with pytest.raises(ValueError, match="integer"):
        stratified_split(np.array([0.0, 1.0]))
