"""Search-space files (`search_spaces/*.yaml`): load, check every key, and hand back frozen
dataclasses. The schema is documented in search_spaces/README.md.

Everything is checked before Ray starts, and every problem is reported at once, each with the key
that holds it (`params.lr.loguniform: low must be below high, got [1.0, 0.1]`), so that a user
fixes a file in one pass. YAML is read with `yaml.safe_load`: a tag that would build a Python
object is refused like any other malformed file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .bracket import Design
from .config import FIELD_NAMES, VARIANTS, ConfigError, TrialConfig, batch_split_problem, config_from
from .sections import Draft, number, section
from .strategies import STRATEGIES
from .strategies.scale import Scale
from .strategies.tune import Tune
from .tev_rule import TEVRule

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
# Distribution name -> what its value must be.
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "grid")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Ray 2.60's NVIDIA accelerator names (ray.util.accelerators; tests/test_spec.py keeps them in
# step). The cluster launcher labels each AWS GPU node with its GPU's name.
ACCELERATOR_TYPES = (
    "A100",
    "A100-40G",
    "A100-80G",
    "A10G",
    "B200",
    "B300",
    "GB200",
    "GB300",
    "H100",
    "H20",
    "H200",
    "K80",
    "L4",
    "L40S",
    "P100",
    "P4",
    "RTX-PRO-6000",
    "T4",
    "V100",
)


@dataclass(frozen=True)
class Param:
    """One searched TrialConfig field: `{name: {kind: values}}` in the file."""

    name: str
    kind: str
    """loguniform | uniform (two floats), int (two ints, inclusive), choice | grid (a list)."""
    values: tuple

    def tune_domain(self):
        """The Ray Tune domain for this parameter (what OptunaSearch or the grid sees)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def extremes(self) -> list:
        """The values to check against TrialConfig: both ends of a range, every listed value."""
        return list(self.values)


@dataclass(frozen=True)
class Resources:
    workers: int = 1
    """Ray Train workers per trial (DDP when > 1)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each worker."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; a fraction packs several tiny trials on one GPU."""
    max_concurrent: int = 0
    """Trials running at once; 0 derives it from the cluster's CPUs or GPUs."""
    max_failures: int = 2
    """Times a trial's Train workers are restarted from its last checkpoint after a worker
    dies (a preempted node, an out-of-memory kill) before the trial counts as failed."""
    accelerator_type: str = ""
    """The GPU the space was sized for, by Ray's name (H100, A100-80G, L40S, ...): its Train
    workers run only on nodes with that GPU. Empty: any GPU."""
    population: str = "auto"
    """Members a trial trains at most (tunestab/members.py): `auto`, or a whole number >= 1. A
    trial's members share its variant and size and differ in LR and seed; each is a result of
    its own. Ray's start-up (about 14 CPU-s a trial on 2 cores, docs/overhead.md) is paid once
    per trial, not once per member. `auto`: `AUTO_POPULATION` members; how they are stepped is
    the trial's `engine` (TrialConfig)."""

    def population_size(self) -> int:
        return AUTO_POPULATION if self.population == "auto" else int(self.population)


# What `population: auto` means today: the members a round of the searcher proposes, up to 32,
# on one worker (not yet sized from a device's memory). On a 2-core CPU stepping members in
# turn costs nothing against lone trials but Ray's start-up, saved once per member.
AUTO_POPULATION = 32


@dataclass(frozen=True)
class Scheduler:
    type: str = "tev"
    """tev (the TEV-proxy scheduler) or none (trials end by budget or the loss rule)."""
    shadow: bool = False
    """Record TEV verdicts without stopping trials."""
    rule: TEVRule = field(default_factory=TEVRule)
    """Thresholds of the TEV rule (`TEVRule` fields)."""


@dataclass(frozen=True)
class Space:
    """A whole search-space file, checked."""

    name: str
    """Experiment name: the MLflow experiment and the Tune run directory."""
    strategy: str
    """max_lr | tune | sweep | scale (tunestab/strategies/)."""
    variants: tuple[str, ...]
    """Variants compared; each is searched separately."""
    trial: dict
    """Fixed TrialConfig fields for every trial (model shape, budget, data, ...)."""
    params: tuple[Param, ...]
    """Searched TrialConfig fields."""
    description: str = ""
    max_lr: Design = field(default_factory=Design)
    """The max_lr section (its lo, hi and seed unset: the max_lr strategy fills them in)."""
    scale: Scale = field(default_factory=Scale)
    tune: Tune = field(default_factory=Tune)
    resources: Resources = field(default_factory=Resources)
    scheduler: Scheduler = field(default_factory=Scheduler)
    tracking_uri: str = DEFAULT_TRACKING_URI
    """MLflow tracking URI; a relative sqlite path is relative to the storage folder."""
    storage: str = "~/tunestab_results"
    """Where Tune results, the Optuna study and the scheduler state go (on the driver's machine)."""
    train_storage: str = ""
    """Where trials' Ray Train runs and checkpoints go; empty: inside the run folder. On a
    multi-node cluster every node must reach it: s3://bucket/prefix, gs://..., or a shared mount."""
    source: str = ""
    """The file's path (logged to MLflow as an artifact)."""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def trial_config(self, variant: str, **values) -> TrialConfig:
        return config_from({**self.trial, "variant": variant, **values}, "trial config")

    def arms(self) -> dict[str, dict]:
        """What the strategy brackets and fits separately: label -> the config fields it sets."""
        return STRATEGIES[self.strategy].arms(self)


class SpecError(ConfigError):
    """A search-space file with problems; the message lists them all, each with its key."""


def resolve_path(name_or_path: str) -> Path:
    """`default` -> search_spaces/default.yaml; anything with a suffix or a slash is a path."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        return Path(name_or_path).expanduser()
    return SPACES_DIR / f"{name_or_path}.yaml"


def load(name_or_path: str) -> Space:
    path = resolve_path(name_or_path)
    where = f"search space {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"cannot read the file: {e.strerror or e}"], where) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}"], where) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"not valid YAML{at}: {problem}"], where) from None
    return parse(raw, where, source=str(path))


def _param(name: str, spec, problems: list[str]) -> Param | None:
    key = f"params.{name}"
    if name not in FIELD_NAMES or name == "variant":
        why = "list variants under `variants`" if name == "variant" else "not a TrialConfig field"
        problems.append(f"{key}: unknown parameter ({why})")
        return None
    if not isinstance(spec, dict) or len(spec) != 1:
        problems.append(f"{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        return None
    kind, values = next(iter(spec.items()))
    key = f"{key}.{kind}"
    if kind not in DISTRIBUTIONS:
        problems.append(f"{key}: unknown distribution (known: {', '.join(DISTRIBUTIONS)})")
        return None
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            problems.append(f"{key}: expected a non-empty list, got {values!r}")
            return None
        if len(set(map(repr, values))) != len(values):
            problems.append(f"{key}: repeated values in {values!r}")
        return Param(name, kind, tuple(values))
    if not isinstance(values, list) or len(values) != 2:
        problems.append(f"{key}: expected [low, high], got {values!r}")
        return None
    low, high = values
    if kind == "int" and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        problems.append(f"{key}: expected two integers, got {values!r}")
        return None
    if not (number(low) and number(high)):
        problems.append(f"{key}: expected two finite numbers, got {values!r}")
        return None
    if not low < high:
        problems.append(f"{key}: low must be below high, got {values!r}")
        return None
    if kind == "loguniform" and low <= 0:
        problems.append(f"{key}: a log-uniform range must be > 0, got {values!r}")
        return None
    return Param(name, kind, (low, high))


def _first_problem(p: Param, trial: dict, variants: list[str]) -> list[str]:
    """The problems of the first (value, variant) that makes an invalid trial, if any."""
    for value in p.extremes():
        for variant in variants:
            try:
                config_from({**trial, "variant": variant, p.name: value}, "trial")
            except ConfigError as e:
                return [f"params.{p.name}.{p.kind}: {p.name}={value!r} with variant {variant}: {q}" for q in e.problems]
    return []


# Each strategy's own section (max_lr, tune, scale) sits between params and resources.
SECTIONS = tuple(dict.fromkeys(st.section for st in STRATEGIES.values() if st.section))
TOP_KEYS = (
    "name",
    "description",
    "strategy",
    "variants",
    "trial",
    "params",
    *SECTIONS,
    "resources",
    "scheduler",
    "tracking_uri",
    "storage",
    "train_storage",
)


def parse(raw, where: str = "search space", source: str = "") -> Space:
    """Check a loaded YAML document; raise SpecError with every problem found."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpecError([f"expected a mapping at the top level, got {type(raw).__name__}"], where)
    problems += [f"{k}: unknown key (known: {', '.join(TOP_KEYS)})" for k in raw if k not in TOP_KEYS]
    name, description, strategy = _header(raw, problems)
    variants = _variants(raw, problems)
    trial, trial_ok = _trial(raw, problems)
    params = _params(raw, trial, trial_ok, variants, problems)
    draft = Draft(
        strategy if isinstance(strategy, str) and strategy in STRATEGIES else None,
        tuple(variants),
        trial,
        trial_ok,
        tuple(params),
    )
    sections = {}
    for st in STRATEGIES.values():
        if st.section and st.section not in sections:
            sections[st.section] = st.parse_section(raw, draft, problems)
    resources = _resources(raw, trial, trial_ok, problems)
    scheduler = _scheduler(raw, problems)
    if draft.strategy:
        STRATEGIES[draft.strategy].check(draft, sections, problems)
    tracking_uri, storage, train_storage = _locations(raw, problems)
    if problems:
        raise SpecError(problems, where)
    return Space(
        name=name,
        strategy=strategy,
        variants=tuple(variants),
        trial=dict(trial),
        params=tuple(params),
        description=description,
        **sections,
        resources=resources,
        scheduler=scheduler,
        tracking_uri=tracking_uri,
        storage=storage,
        train_storage=train_storage,
        source=source,
    )


def _header(raw: dict, problems: list[str]) -> tuple[str, str, str]:
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\0"):
        problems.append(f"name: expected a non-empty name without slashes, got {name!r}")
        name = "invalid"
    description = raw.get("description") or ""
    if not isinstance(description, str):
        problems.append(f"description: expected text, got {description!r}")
    strategy = raw.get("strategy")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        problems.append(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return name, description, strategy


def _variants(raw: dict, problems: list[str]) -> list[str]:
    variants = raw.get("variants")
    if not isinstance(variants, list) or not variants:
        problems.append(f"variants: expected a non-empty list of variant names, got {variants!r}")
        variants = []
    bad = [v for v in variants if not isinstance(v, str) or v not in VARIANTS]
    if bad:
        problems.append(f"variants: unknown {bad!r} (known: {', '.join(VARIANTS)})")
    if len(set(map(repr, variants))) != len(variants):
        problems.append(f"variants: listed twice in {variants!r}")
    return [v for v in variants if isinstance(v, str) and v in VARIANTS]


def _trial(raw: dict, problems: list[str]) -> tuple[dict, bool]:
    """The fixed TrialConfig fields, and whether they make a valid config."""
    trial = raw.get("trial") or {}
    if not isinstance(trial, dict):
        problems.append(f"trial: expected a mapping of TrialConfig fields, got {type(trial).__name__}")
        trial = {}
    if "variant" in trial:
        problems.append("trial.variant: list variants under `variants`")
        trial = {k: v for k, v in trial.items() if k != "variant"}
    try:
        config_from(trial, "trial")
    except ConfigError as e:
        problems += [f"trial.{p}" for p in e.problems]
        return trial, False
    return trial, True


def _params(raw: dict, trial: dict, trial_ok: bool, variants: list[str], problems: list[str]) -> list[Param]:
    params_raw = raw.get("params") or {}
    params: list[Param] = []
    if not isinstance(params_raw, dict):
        problems.append(f"params: expected a mapping of parameter -> distribution, got {params_raw!r}")
        return params
    for pname, pspec in params_raw.items():
        if pname in trial:
            problems.append(f"params.{pname}: also fixed under trial.{pname}; keep one")
        p = _param(pname, pspec, problems)
        if p:
            params.append(p)
    # Each value a parameter can take must make a valid trial with every variant.
    if trial_ok:
        for p in params:
            problems += _first_problem(p, trial, variants or ["baseline"])
    return params


def _resources(raw: dict, trial: dict, trial_ok: bool, problems: list[str]) -> Resources:
    def population(value, key: str):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return str(value)
        problems.append(f"{key}: expected auto or a whole number >= 1, got {value!r}")
        return None

    r = section(raw, "resources", Resources, problems, convert={"population": population})
    if r.workers < 1:
        problems.append(f"resources.workers: must be >= 1, got {r.workers}")
    if r.cpus_per_worker < 0 or r.gpus_per_worker < 0:
        problems.append("resources: cpus_per_worker and gpus_per_worker must be >= 0")
    if r.gpus_per_worker > 1 and r.gpus_per_worker != int(r.gpus_per_worker):
        problems.append(f"resources.gpus_per_worker: above 1 it must be whole, got {r.gpus_per_worker}")
    if r.workers > 1 and 0 < r.gpus_per_worker < 1:
        problems.append(
            f"resources.gpus_per_worker: {r.gpus_per_worker} with {r.workers} workers "
            "would put two NCCL ranks on one GPU, which NCCL refuses ('Duplicate GPU detected'); "
            "a fraction of a GPU is for one-worker trials"
        )
    if r.accelerator_type and r.accelerator_type not in ACCELERATOR_TYPES:
        problems.append(
            f"resources.accelerator_type: unknown {r.accelerator_type!r} (Ray's names: {', '.join(ACCELERATOR_TYPES)})"
        )
    if r.accelerator_type and not r.gpus_per_worker:
        problems.append("resources.accelerator_type: names a GPU, but gpus_per_worker is 0")
    for key in ("max_concurrent", "max_failures"):
        if getattr(r, key) < 0:
            problems.append(f"resources.{key}: must be >= 0, got {getattr(r, key)}")
    if trial_ok and r.workers >= 1:
        cfg = config_from(trial, "trial")
        problem = batch_split_problem(cfg.batch_size, cfg.micro_batch_size, r.workers)
        if problem:
            problems.append(f"trial.{problem} (resources.workers={r.workers})")
    return r


def _scheduler(raw: dict, problems: list[str]) -> Scheduler:
    def rule_from(value, key):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of TEVRule fields, got {value!r}")
            return TEVRule()
        sub: list[str] = []

        def step_or_none(v, where):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                sub.append(f"{where}: expected an int (or null: the trial's warm-up), got {v!r}")
                return None
            return v

        rule = section({"rule": value}, "rule", TEVRule, sub, convert={"min_step": step_or_none})
        problems.extend(f"scheduler.{q}" for q in sub)
        problems.extend(f"{key}.{q}" for q in rule.problems())
        return rule

    scheduler = section(raw, "scheduler", Scheduler, problems, convert={"rule": rule_from})
    if scheduler.type not in ("tev", "none"):
        problems.append(f"scheduler.type: expected tev or none, got {scheduler.type!r}")
    return scheduler


def _locations(raw: dict, problems: list[str]) -> tuple[str, str, str]:
    tracking_uri = raw.get("tracking_uri", DEFAULT_TRACKING_URI)
    if not isinstance(tracking_uri, str) or not tracking_uri:
        problems.append(f"tracking_uri: expected a URI, got {tracking_uri!r}")
    storage = raw.get("storage", "~/tunestab_results")
    if not isinstance(storage, str) or not storage:
        problems.append(f"storage: expected a folder, got {storage!r}")
    train_storage = raw.get("train_storage", "")
    if not isinstance(train_storage, str):
        problems.append(f"train_storage: expected a folder or a URI such as s3://bucket/prefix, got {train_storage!r}")
    return tracking_uri, storage, train_storage
