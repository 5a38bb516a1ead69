"""Search spaces: which `TrainConfig` fields a search varies, how, and how it judges trials.

A space is a YAML file (format documented in search_spaces/README.md). It is validated in full
before Ray starts: an unknown key, an unknown distribution, low > high, an unknown model or a
non-positive epoch count is reported with the file, the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import tune

from prado_dist.config import SCHEDULABLE, ConfigError, TrainConfig, format_validation_error
from prado_dist.distributed import WorkerResources
from prado_dist.models import is_model, unknown_model

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
REPORTED_METRICS = ("val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_loss")
# Settings that belong to the space as a whole, never to one trial.
NOT_SEARCHABLE = {"data_dir", "cache_dir", "model", "epochs", "device", "pretrained"}
# Settings that define the data every trial is compared on. The final test runs on the driver's data
# (the fixed value): a searched image size would test at another resolution, a searched split a test
# split that overlaps the trial's training images (issue 21, item 7). Refused, with the reason.
DATA_DEFINING = {
    "image_size": "the best trial is tested on the driver's images at the fixed image_size",
    "split_seed": "another split_seed would put the trial's training images in the driver's test split",
    "test_fraction": "another test_fraction would put the trial's training images in the driver's test split",
    "val_fraction": "trials must be compared on one validation split",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Uniform(_Strict):
    distribution: Literal["uniform"]
    low: float
    high: float


class LogUniform(_Strict):
    distribution: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class IntUniform(_Strict):
    distribution: Literal["randint"]
    low: int
    high: int  # inclusive


class Choice(_Strict):
    distribution: Literal["choice"]
    values: list[Any] = Field(min_length=1)


Distribution = Annotated[Uniform | LogUniform | IntUniform | Choice, Field(discriminator="distribution")]
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


class Scheduler(_Strict):
    """How trials are judged while they train, on completed epochs.

    asha: stop the worse trials at rungs grace_period * reduction_factor^k (with TPE or random search).
    fifo: no early stopping; every trial trains all its epochs (a baseline for asha).
    pbt / pb2: population-based training; `num_samples` members train side by side, and every
    `perturbation_interval` epochs the bottom `quantile_fraction` copy a top member's checkpoint and
    go on with its settings perturbed: by PBT at random (x0.8 or x1.2, or redrawn with
    `resample_probability`), by PB2 from a Gaussian-process bandit over the params' bounds.
    """

    kind: Literal["asha", "fifo", "pbt", "pb2"] = "asha"
    grace_period: int = Field(1, ge=1)  # asha
    reduction_factor: float = Field(3.0, gt=1.0)  # asha
    perturbation_interval: int = Field(2, ge=1)  # pbt, pb2: epochs between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)  # pbt, pb2
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)  # pbt

    @property
    def population_based(self) -> bool:
        return self.kind in ("pbt", "pb2")


class SearcherSettings(_Strict):
    """How trials are proposed, the report's configuration first. tpe: Optuna TPE, whose first
    `startup_trials` trials are drawn at random (the report's configuration counts as one), later ones
    from a model of the trials so far; Optuna's default is 10, which leaves a search of 10 trials or
    fewer random, so a small budget wants fewer. random: Tune's random sampling (a baseline for tpe).
    A population-based scheduler draws its first population at random whatever this says."""

    kind: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(10, ge=1)


class TrialResources(_Strict):
    """How each trial runs. One worker (the default): the engine trains inside the trial's own Tune
    actor, reused between trials (issue 20). `workers` >= 2, or `ray_train: always`: a Ray Train run
    (TorchTrainer, DDP over the workers), e.g. to compare both paths."""

    workers: int = Field(1, ge=1)  # data-parallel workers per trial
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    ray_train: Literal["auto", "always"] = "auto"  # auto: Ray Train only for workers >= 2

    def worker_resources(self) -> WorkerResources:
        """What each trial's worker(s) ask for."""
        return WorkerResources(self.workers, self.cpus_per_worker, self.gpus_per_worker)

    @property
    def uses_ray_train(self) -> bool:
        return self.workers > 1 or self.ray_train == "always"


class SearchSpace(_Strict):
    """A validated search space."""

    name: str
    model: str
    fixed: dict[str, Any] = {}  # TrainConfig fields every trial shares (epochs, image_size, ...)
    params: dict[str, Distribution]  # TrainConfig fields the search varies
    baseline: dict[str, Any] = {}  # the report's values, where they differ from TrainConfig defaults
    metric: Literal[REPORTED_METRICS] = "val_balanced_accuracy"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    scheduler: Scheduler = Scheduler()
    searcher: SearcherSettings = SearcherSettings()
    trial: TrialResources = TrialResources()
    num_samples: int = Field(20, ge=1)
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the cluster fits
    search_seed: int = 0  # the searcher's (Optuna TPE's, or random search's) seed; `seed` is training's

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if not is_model(model):
            raise ValueError(unknown_model(model))
        return model

    @field_validator("params")
    @classmethod
    def _searchable(cls, params: dict[str, Any]) -> dict[str, Any]:
        data_defining = [f"{key} ({DATA_DEFINING[key]})" for key in params if key in DATA_DEFINING]
        if data_defining:
            raise ValueError(
                f"cannot search {'; '.join(data_defining)}: set it once for the whole search "
                "(fixed: or --set KEY=VALUE) and compare searches instead"
            )
        fields = set(TrainConfig.model_fields) - NOT_SEARCHABLE - set(DATA_DEFINING)
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(f"cannot search {unknown}; searchable settings: {sorted(fields)}")
        if not params:
            raise ValueError("a search space needs at least one parameter to search")
        for key, spec in params.items():
            if isinstance(spec, Uniform | LogUniform | IntUniform) and spec.low > spec.high:
                raise ValueError(f"{key}: low ({spec.low}) must not exceed high ({spec.high})")
        return params

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpace:
        overlap = sorted(set(self.fixed) & set(self.params))
        if overlap:
            raise ValueError(f"{overlap} are both fixed and searched; keep each in one place")
        self.base_config()  # fixed settings must form a valid TrainConfig
        self._check_bounds()
        self._check_population_params()
        baseline = self.baseline_point()
        for key, spec in self.params.items():
            if not _contains(spec, baseline[key]):
                raise ValueError(
                    f"baseline {key}={baseline[key]!r} (the report's value) lies outside the searched "
                    f"range {spec.model_dump(exclude={'distribution'})}; widen the range or set baseline.{key}"
                )
        return self

    def _check_bounds(self) -> None:
        """Every value a distribution can draw must be a valid setting, not only the baseline: a trial
        drawn outside the field's range would fail three times inside Ray (issue 21, item 6)."""
        for key, spec in self.params.items():
            values = spec.values if isinstance(spec, Choice) else [spec.low, spec.high]
            for value in values:
                try:
                    self.base_config(**{key: value})
                except ConfigError as err:
                    raise ValueError(
                        f"{key}: the searched range {spec.model_dump(exclude={'distribution'})} reaches {value!r}, "
                        f"which is not a valid {key} ({err}); narrow the range to valid values"
                    ) from None

    def _check_population_params(self) -> None:
        """A population-based search changes its params during a trial: only SCHEDULABLE ones can."""
        kind = self.scheduler.kind
        if not self.scheduler.population_based:
            return
        fixed_only = sorted(set(self.params) - set(SCHEDULABLE))
        if fixed_only:
            raise ValueError(
                f"scheduler.kind={kind} changes the searched settings while trials train, and {fixed_only} cannot "
                f"change during a run (only {list(SCHEDULABLE)} can): make them fixed, or use scheduler.kind=asha"
            )
        choices = sorted(key for key, spec in self.params.items() if isinstance(spec, Choice))
        if kind == "pb2" and choices:
            raise ValueError(
                f"scheduler.kind=pb2 models continuous bounds, and {choices} are choices: search them with "
                "uniform or loguniform, or use scheduler.kind=pbt"
            )

    # --- derived --------------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return self.base_config().epochs

    def base_config(self, **overrides: Any) -> TrainConfig:
        """The config every trial starts from: defaults, then `fixed`, then `overrides`."""
        return TrainConfig().with_overrides({"model": self.model, **self.fixed, **overrides})

    def baseline_point(self) -> dict[str, Any]:
        """The report's configuration, restricted to the searched parameters."""
        defaults = self.base_config().model_dump()
        return {key: self.baseline.get(key, defaults[key]) for key in self.params}

    def tune_space(self) -> dict[str, Any]:
        """The searched parameters as Ray Tune domains (OptunaSearch converts them)."""
        return {key: _domain(spec) for key, spec in self.params.items()}


def _contains(spec: Any, value: Any) -> bool:
    if isinstance(spec, Choice):
        return value in spec.values
    return value is not None and spec.low <= value <= spec.high


def _domain(spec: Any) -> Any:
    if isinstance(spec, Uniform):
        return tune.uniform(spec.low, spec.high)
    if isinstance(spec, LogUniform):
        return tune.loguniform(spec.low, spec.high)
    if isinstance(spec, IntUniform):
        return tune.randint(spec.low, spec.high + 1)  # Tune's upper bound is exclusive
    return tune.choice(spec.values)


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A name from search_spaces/ (without .yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"search space file {path} does not exist")
        return path
    candidate = SPACES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown search space {str(name_or_path)!r}; known spaces: {known_spaces()} or a path")
    return candidate


def known_spaces() -> list[str]:
    return sorted(path.stem for path in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Load and validate a space; `overrides` (from --set) replace fixed settings or top-level keys."""
    path = resolve_space_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search space must be a YAML mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        _apply_override(raw, key, value, path)
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, str(path)) + f"\n(distributions: {', '.join(DISTRIBUTIONS)}; "
            f"top-level keys: {sorted(SearchSpace.model_fields)})"
        ) from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _apply_override(raw: dict[str, Any], key: str, value: Any, path: Path) -> None:
    """`--set key=value`: a TrainConfig field goes to `fixed` (and leaves `params`); else top level."""
    if key in TrainConfig.model_fields and key != "model":
        raw.setdefault("fixed", {})[key] = value
        raw.get("params", {}).pop(key, None)
    elif key in SearchSpace.model_fields or key.split(".")[0] in {"scheduler", "searcher", "trial"}:
        section, _, sub = key.partition(".")
        if sub:
            raw.setdefault(section, {})[sub] = value
        else:
            raw[key] = value
    else:
        raise ConfigError(
            f"--set {key}: unknown setting; use a training setting ({sorted(TrainConfig.model_fields)}) or a "
            f"space key ({sorted(SearchSpace.model_fields)}, scheduler.*, searcher.*, trial.*)"
        )
