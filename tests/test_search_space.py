"""Search spaces are validated before Ray starts, with the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prado_dist.config import ConfigError
from prado_dist.distributed import WorkerResources
from prado_dist.search import known_spaces, load_space, parse_set
from prado_dist.search.plots import ParameterAxis, parameter_axes

GOOD = {
    "model": "mobilenet",
    "fixed": {"epochs": 3, "image_size": 32},
    "params": {
        "lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2},
        "decay": {"distribution": "uniform", "low": 0.0, "high": 0.2},
        "decay_start": {"distribution": "randint", "low": 0, "high": 10},
        "flip_prob": {"distribution": "choice", "values": [0.0, 0.5]},
    },
}


def write(tmp_path: Path, content: dict | str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize("name", known_spaces())
def test_every_shipped_space_is_valid(name: str) -> None:
    space = load_space(name)
    assert space.name == name
    assert {"lr"} <= set(space.params)
    # The report's configuration is the first point and must lie inside the searched ranges.
    assert set(space.baseline_point()) == set(space.params)


def test_custom_spaces_cover_the_required_parameters() -> None:
    for name in ("resnet29", "vgg", "mobilenet"):
        assert {"lr", "decay", "decay_start", "pca_std", "flip_prob"} <= set(load_space(name).params)


def test_baseline_is_the_reports_configuration(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, GOOD))
    assert space.baseline_point() == {"lr": 1e-3, "decay": 0.05, "decay_start": 10, "flip_prob": 0.5}


def test_randint_upper_bound_is_inclusive(tmp_path: Path) -> None:
    domain = load_space(write(tmp_path, GOOD)).tune_space()["decay_start"]
    assert domain.lower == 0 and domain.upper == 11


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s.update(colour="red"), "colour"),  # unknown top-level key
        (lambda s: s["params"].update(momentum={"distribution": "uniform", "low": 0, "high": 1}), "momentum"),
        (lambda s: s["params"]["lr"].update(distribution="gaussian"), "distribution"),
        (lambda s: s["params"]["decay"].update(low=0.5, high=0.1), "must not exceed"),
        (lambda s: s.update(model="alexnet"), "unknown model"),
        (lambda s: s["fixed"].update(epochs=-3), "epochs"),
        (lambda s: s["fixed"].update(epochs=0), "epochs"),
        (lambda s: s["params"]["lr"].update(low=-1), "lr"),
        (lambda s: s["params"]["lr"].update(low=0.01, high=0.1), "outside the searched range"),
        (lambda s: s.update(metric="val_top5"), "metric"),
        (lambda s: s["fixed"].update(lr=0.1), "both fixed and searched"),
        (lambda s: s.update(searcher={"startup_trials": 0}), "searcher.startup_trials"),
        (lambda s: s.update(searcher={"trials": 3}), "searcher.trials"),
    ],
)
def test_bad_spaces_are_rejected_with_file_and_key(tmp_path: Path, mutate, expected: str) -> None:
    content = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(content)
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert str(path) in message and expected in message


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model: mobilenet\nparams:\n  lr: {distribution: uniform, low: 0\n  decay: 1\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_space(path)


def test_unknown_space_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known spaces: .*demo"):
        load_space("no_such_space")


def test_set_overrides_fixed_settings_and_space_keys(tmp_path: Path) -> None:
    overrides = parse_set(["epochs=7", "num_samples=3", "scheduler.grace_period=2", "lr=3e-3"])
    space = load_space(write(tmp_path, GOOD), overrides)
    assert space.epochs == 7 and space.num_samples == 3 and space.scheduler.grace_period == 2
    assert "lr" not in space.params and space.base_config().lr == 3e-3  # --set fixes a searched value


def test_trial_settings_become_each_trials_ray_train_resources(tmp_path: Path) -> None:
    overrides = parse_set(["trial.workers=2", "trial.cpus_per_worker=0.5", "trial.gpus_per_worker=0.25"])
    resources = load_space(write(tmp_path, GOOD), overrides).trial.worker_resources()
    assert resources == WorkerResources(workers=2, cpus_per_worker=0.5, gpus_per_worker=0.25)


def test_searcher_seed_and_training_seed_are_set_apart(tmp_path: Path) -> None:
    # One `seed` key for both once sent --set seed=N to training only: every "seed" of a benchmark
    # then drew the same trial configurations.
    space = load_space(write(tmp_path, GOOD), parse_set(["search_seed=5", "seed=7"]))
    assert space.search_seed == 5 and space.base_config().seed == 7
    assert load_space(write(tmp_path, GOOD)).search_seed == 0


@pytest.mark.parametrize(
    ("item", "expected"), [("nonsense=1", "unknown setting"), ("epochs=many", "epochs"), ("novalue", "key=value")]
)
def test_bad_set_values_are_rejected(tmp_path: Path, item: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_space(write(tmp_path, GOOD), parse_set([item]))


def test_parameter_effects_are_drawn_over_the_searched_ranges() -> None:
    axes = parameter_axes(load_space("mobilenet"))
    assert axes["lr"] == ParameterAxis(log=True, limits=(1e-4, 1e-2))
    assert axes["decay_start"] == ParameterAxis(limits=(0, 25))
    assert axes["flip_prob"] == ParameterAxis(categories=(0.0, 0.5))
