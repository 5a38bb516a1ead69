"""What each node of a cluster is asked before a search (prado_dist/distributed/node_data.py), and the
check a trial makes on a node that joined later (search/trial.py). The cluster path itself runs in
tests/test_multinode.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from prado_dist.config import TrainConfig
from prado_dist.data import DataError, prepare_data
from prado_dist.distributed import data_fingerprint
from prado_dist.search.trial import require_driver_data


def test_a_node_computes_the_fingerprint_the_driver_decoded_under(small_demo: Path, tmp_path: Path) -> None:
    decoded = prepare_data(small_demo, 16, cache_dir=tmp_path / "cache")
    assert data_fingerprint(small_demo, 16) == decoded.fingerprint
    assert data_fingerprint(small_demo, 24) != decoded.fingerprint  # another size is another cache


def test_a_node_with_other_files_has_another_fingerprint(small_demo: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(small_demo, tmp_path / "copy")
    assert data_fingerprint(copy, 16) == data_fingerprint(small_demo, 16)  # the same files elsewhere
    next(copy.rglob("*.jpg")).unlink()
    assert data_fingerprint(copy, 16) != data_fingerprint(small_demo, 16)


def test_a_node_without_the_folder_says_which_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        data_fingerprint(tmp_path / "nowhere", 16)


def test_a_trial_refuses_images_that_are_not_the_drivers(small_demo: Path, tmp_path: Path) -> None:
    data = prepare_data(small_demo, 32, cache_dir=tmp_path / "cache")
    config = TrainConfig(data_dir=small_demo, image_size=32)
    require_driver_data(data, data.fingerprint, config)  # the same images: trains
    require_driver_data(data, None, config)  # nothing to compare with (a search from before the check)
    with pytest.raises(DataError, match=f"not the driver's.*{data.fingerprint[:12]}.*ffffffffffff"):
        require_driver_data(data, "f" * 64, config)
