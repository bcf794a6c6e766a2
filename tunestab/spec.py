"""Search-space files (`search_spaces/*.yaml`): load, check every key, and hand back frozen
dataclasses. The schema is documented in search_spaces/README.md.

Everything is checked before Ray starts, and every problem is reported at once, each with the key
that holds it (`params.lr.loguniform: low must be below high, got [1.0, 0.1]`), so that a user
fixes a file in one pass. YAML is read with `yaml.safe_load`: a tag that would build a Python
object is refused like any other malformed file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import FIELD_NAMES, VARIANTS, ConfigError, TrialConfig, config_from
from .tev_rule import TEVRule

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
STRATEGIES = ("max_lr", "tune", "sweep", "scale")
SAMPLERS = ("tpe", "gp", "cmaes")
# Distribution name -> what its value must be.
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "grid")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Ray 2.60's NVIDIA accelerator names (ray.util.accelerators; tests/test_spec.py keeps them in
# step). The cluster launcher labels each AWS GPU node with its GPU's name.
ACCELERATOR_TYPES = ("A100", "A100-40G", "A100-80G", "A10G", "B200", "B300", "GB200", "GB300", "H100", "H20",
                     "H200", "K80", "L4", "L40S", "P100", "P4", "RTX-PRO-6000", "T4", "V100")


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


@dataclass(frozen=True)
class MaxLR:
    ratio: float = 1.41
    """Bracketing ends when smallest divergent / largest stable LR is at most this."""
    slots: int = 2
    """Bracketing trials per variant proposed in parallel inside the current bracket."""
    max_trials: int = 12
    """Bracketing trials per variant at most, bracket or not."""
    seeds: int = 4
    """Boundary seeds: each runs `points` LRs around the bracket (0: the bracket alone, no interval)."""
    points: int = 4
    """LRs per boundary seed, `step` apart; more are added where the boundary lies past them."""
    step: float = 1.41
    """Ratio between a boundary seed's neighbouring LRs."""
    p_diverge: float = 0.1
    """The max stable LR is where the fitted P(diverge | LR) crosses this."""
    range_test: bool = False
    """Start each variant with an LR range test (one run, the LR climbing from the range's low
    to its high end, ended where its loss passes l0); the bracket starts from where it failed."""
    range_margin: float = 4.0
    """After a range test failing at r, the first bracketing trials sit at r / range_margin^(i /
    slots), i = 1 ... slots."""


# Fields a size may not set: each size is measured at every variant, lr and seed by max_lr.
NOT_SIZE_FIELDS = ("variant", "lr", "seed", "lr_schedule", "lr_range_start")


@dataclass(frozen=True)
class Scale:
    """The `scale` strategy: `max_lr` at several model sizes, a fit of log max stable LR against
    log parameter count per variant, and a prediction at a larger size (tunestab/scaling.py)."""

    sizes: dict = field(default_factory=dict)
    """Measured sizes: name -> the TrialConfig fields that make it (d_model, n_layer, n_head, ...)."""
    target: dict = field(default_factory=dict)
    """The one size to predict: name -> its fields."""
    measure_target: bool = False
    """Also run max_lr at the target; the fit never sees it, so it checks the prediction."""
    logit_threshold: float = 1.0e4
    """Wortsman et al.'s second predictor: the largest LR at which the max attention logit,
    extrapolated to the target size, stays below this (their runs above 1e4 diverged)."""

    @property
    def every_size(self) -> dict:
        """The measured sizes, then the target: name -> fields."""
        return {**self.sizes, **self.target}

    def arms(self, variants) -> dict[str, dict]:
        """`variant@size` -> its fields (the variant included), in order: sizes, then the target
        when it is measured."""
        sizes = self.every_size if self.measure_target else self.sizes
        return {f"{v}@{name}": {"variant": v, **fields} for v in variants for name, fields in sizes.items()}

    def size_of(self, config: dict) -> str | None:
        """The size whose fields a trial's config carries (None: none of them)."""
        sizes = self.every_size
        matching = [name for name, fields in sizes.items() if all(config.get(k) == v for k, v in fields.items())]
        # One size's fields may be a subset of another's ({d_model: 64} and {d_model: 64, n_layer: 4}):
        # the trial is the one that names the most of its config (parse refuses identical sizes).
        return max(matching, key=lambda name: len(sizes[name]), default=None)


@dataclass(frozen=True)
class Tune:
    sampler: str = "tpe"
    """Optuna sampler: tpe, gp or cmaes."""
    num_samples: int = 16
    """Configurations Optuna proposes in all (over all variants)."""
    seeds: int = 1
    """Seeds each configuration runs at (trial.seed, + 1, ...); Optuna sees their mean objective."""
    seed: int = 0
    """Sampler seed."""


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
    """max_lr | tune | sweep."""
    variants: tuple[str, ...]
    """Variants compared; each is searched separately."""
    trial: dict
    """Fixed TrialConfig fields for every trial (model shape, budget, data, ...)."""
    params: tuple[Param, ...]
    """Searched TrialConfig fields."""
    description: str = ""
    max_lr: MaxLR = field(default_factory=MaxLR)
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
        """What max_lr brackets separately: each variant, or for `scale` each variant at each size
        (`variant@size` -> the config fields it sets)."""
        if self.strategy == "scale":
            return self.scale.arms(self.variants)
        return {v: {"variant": v} for v in self.variants}


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
        text = path.read_text()
    except OSError as e:
        raise SpecError([f"cannot read the file: {e.strerror or e}"], where) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"not valid YAML{at}: {problem}"], where) from None
    return parse(raw, where, source=str(path))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _section(raw: dict, key: str, cls, problems: list[str], convert=None):
    """Build a small dataclass from a mapping, reporting unknown keys and wrong types."""
    value = raw.get(key, {})
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping, got {type(value).__name__}")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in value.items():
        if k not in known:
            problems.append(f"{key}.{k}: unknown key (known: {', '.join(known)})")
            continue
        default = getattr(cls(), k)
        if convert and k in convert:
            kwargs[k] = convert[k](v, f"{key}.{k}")
            continue
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = _number(v)
        else:
            ok = isinstance(v, str)
        if not ok:
            problems.append(f"{key}.{k}: expected {type(default).__name__}, got {v!r}")
            continue
        kwargs[k] = v
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


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
    if not (_number(low) and _number(high)):
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


def _scale(raw: dict, trial: dict, trial_ok: bool, variants: list[str], params: list[Param],
           problems: list[str]) -> Scale:
    """The `scale` section: sizes and target are mappings of name -> TrialConfig fields, each
    checked with every variant."""
    value = raw.get("scale") or {}
    if not isinstance(value, dict):
        problems.append(f"scale: expected a mapping, got {type(value).__name__}")
        return Scale()
    known = ("sizes", "target", "measure_target", "logit_threshold")
    for k in value:
        if k not in known:
            problems.append(f"scale.{k}: unknown key (known: {', '.join(known)})")
    out = {}
    for key in ("sizes", "target"):
        sizes = value.get(key) or {}
        if not isinstance(sizes, dict) or not all(isinstance(f, dict) for f in sizes.values()):
            problems.append(f"scale.{key}: expected a mapping of size name -> TrialConfig fields, got {sizes!r}")
            sizes = {}
        for name, fields in sizes.items():
            where = f"scale.{key}.{name}"
            if not isinstance(name, str) or not name or any(c in name for c in "@/\\ "):
                problems.append(f"{where}: a size name is a word without @, slashes or spaces")
            if not fields:
                problems.append(f"{where}: names no TrialConfig field")
            for f in fields:
                if f in NOT_SIZE_FIELDS:
                    problems.append(f"{where}.{f}: a size cannot set {f} (the search does)")
                elif any(p.name == f for p in params):
                    problems.append(f"{where}.{f}: also searched under params.{f}; keep one")
            if trial_ok and not any(f in NOT_SIZE_FIELDS for f in fields):
                for variant in variants or ["baseline"]:
                    try:
                        config_from({**trial, "variant": variant, **fields}, "size")
                    except ConfigError as e:
                        problems.extend(f"{where}: with variant {variant}: {q}" for q in e.problems)
                        break
        out[key] = dict(sizes)
    measure = value.get("measure_target", False)
    if not isinstance(measure, bool):
        problems.append(f"scale.measure_target: expected true or false, got {measure!r}")
        measure = False
    threshold = value.get("logit_threshold", Scale.logit_threshold)
    if not _number(threshold) or threshold <= 0:
        problems.append(f"scale.logit_threshold: expected a number > 0, got {threshold!r}")
        threshold = Scale.logit_threshold
    if raw.get("strategy") == "scale":
        seen: list[tuple[object, str]] = []
        for name, fields in {**out["sizes"], **out["target"]}.items():
            try:
                cfg = config_from({**trial, "variant": (variants or ["baseline"])[0], **fields}, "size")
            except ConfigError:
                continue  # reported above
            same = next((other for c, other in seen if c == cfg), None)
            if same is not None:
                problems.append(f"scale: sizes {same} and {name} make the same model")
            seen.append((cfg, name))
        if len(out["sizes"]) < 2:
            problems.append(f"scale.sizes: the scale strategy fits a line through two sizes or more, "
                            f"got {len(out['sizes'])}")
        if len(out["target"]) != 1:
            problems.append(f"scale.target: expected one size to predict, got {len(out['target'])}")
        overlap = set(out["sizes"]) & set(out["target"])
        if overlap:
            problems.append(f"scale.target: {sorted(overlap)} is also a measured size")
    return Scale(out["sizes"], out["target"], measure, float(threshold))


TOP_KEYS = ("name", "description", "strategy", "variants", "trial", "params", "max_lr", "scale", "tune",
            "resources", "scheduler", "tracking_uri", "storage", "train_storage")


def parse(raw, where: str = "search space", source: str = "") -> Space:
    """Check a loaded YAML document; raise SpecError with every problem found."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpecError([f"expected a mapping at the top level, got {type(raw).__name__}"], where)
    for k in raw:
        if k not in TOP_KEYS:
            problems.append(f"{k}: unknown key (known: {', '.join(TOP_KEYS)})")

    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\0"):
        problems.append(f"name: expected a non-empty name without slashes, got {name!r}")
        name = "invalid"
    description = raw.get("description") or ""
    if not isinstance(description, str):
        problems.append(f"description: expected text, got {description!r}")
    strategy = raw.get("strategy")
    if strategy not in STRATEGIES:
        problems.append(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")

    variants = raw.get("variants")
    if not isinstance(variants, list) or not variants:
        problems.append(f"variants: expected a non-empty list of variant names, got {variants!r}")
        variants = []
    bad = [v for v in variants if not isinstance(v, str) or v not in VARIANTS]
    if bad:
        problems.append(f"variants: unknown {bad!r} (known: {', '.join(VARIANTS)})")
    if len(set(map(repr, variants))) != len(variants):
        problems.append(f"variants: listed twice in {variants!r}")
    variants = [v for v in variants if isinstance(v, str) and v in VARIANTS]

    trial = raw.get("trial") or {}
    if not isinstance(trial, dict):
        problems.append(f"trial: expected a mapping of TrialConfig fields, got {type(trial).__name__}")
        trial = {}
    if "variant" in trial:
        problems.append("trial.variant: list variants under `variants`")
        trial = {k: v for k, v in trial.items() if k != "variant"}
    trial_ok = True
    try:
        config_from(trial, "trial")
    except ConfigError as e:
        problems += [f"trial.{p}" for p in e.problems]
        trial_ok = False

    params_raw = raw.get("params") or {}
    params: list[Param] = []
    if not isinstance(params_raw, dict):
        problems.append(f"params: expected a mapping of parameter -> distribution, got {params_raw!r}")
    else:
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

    max_lr = _section(raw, "max_lr", MaxLR, problems)
    scale = _scale(raw, trial, trial_ok, variants, params, problems)
    tune_ = _section(raw, "tune", Tune, problems)
    resources = _section(raw, "resources", Resources, problems)

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

        rule = _section({"rule": value}, "rule", TEVRule, sub, convert={"min_step": step_or_none})
        problems.extend(f"scheduler.{q}" for q in sub)
        problems.extend(f"{key}.{q}" for q in rule.problems())
        return rule

    scheduler = _section(raw, "scheduler", Scheduler, problems, convert={"rule": rule_from})

    if max_lr.ratio <= 1:
        problems.append(f"max_lr.ratio: must be > 1, got {max_lr.ratio}")
    if max_lr.step <= 1:
        problems.append(f"max_lr.step: must be > 1, got {max_lr.step}")
    if max_lr.range_margin <= 1:
        problems.append(f"max_lr.range_margin: must be > 1, got {max_lr.range_margin}")
    if max_lr.seeds < 0:
        problems.append(f"max_lr.seeds: must be >= 0, got {max_lr.seeds}")
    if max_lr.points < 2:
        problems.append(f"max_lr.points: must be >= 2, got {max_lr.points}")
    if not 0 < max_lr.p_diverge < 0.5:
        problems.append(f"max_lr.p_diverge: must be in (0, 0.5), got {max_lr.p_diverge}")
    for key, value in (("max_lr.slots", max_lr.slots), ("max_lr.max_trials", max_lr.max_trials),
                       ("tune.num_samples", tune_.num_samples), ("tune.seeds", tune_.seeds),
                       ("resources.workers", resources.workers)):
        if value < 1:
            problems.append(f"{key}: must be >= 1, got {value}")
    if tune_.sampler not in SAMPLERS:
        problems.append(f"tune.sampler: expected one of {', '.join(SAMPLERS)}, got {tune_.sampler!r}")
    if resources.cpus_per_worker < 0 or resources.gpus_per_worker < 0:
        problems.append("resources: cpus_per_worker and gpus_per_worker must be >= 0")
    if resources.gpus_per_worker > 1 and resources.gpus_per_worker != int(resources.gpus_per_worker):
        problems.append(f"resources.gpus_per_worker: above 1 it must be whole, got {resources.gpus_per_worker}")
    if resources.workers > 1 and 0 < resources.gpus_per_worker < 1:
        problems.append(f"resources.gpus_per_worker: {resources.gpus_per_worker} with {resources.workers} workers "
                        "would put two NCCL ranks on one GPU, which NCCL refuses ('Duplicate GPU detected'); "
                        "a fraction of a GPU is for one-worker trials")
    if resources.accelerator_type and resources.accelerator_type not in ACCELERATOR_TYPES:
        problems.append(f"resources.accelerator_type: unknown {resources.accelerator_type!r} "
                        f"(Ray's names: {', '.join(ACCELERATOR_TYPES)})")
    if resources.accelerator_type and not resources.gpus_per_worker:
        problems.append("resources.accelerator_type: names a GPU, but gpus_per_worker is 0")
    for key in ("max_concurrent", "max_failures"):
        if getattr(resources, key) < 0:
            problems.append(f"resources.{key}: must be >= 0, got {getattr(resources, key)}")
    if trial_ok and resources.workers >= 1:
        cfg = config_from(trial, "trial")
        share = cfg.batch_size // resources.workers
        if cfg.batch_size % resources.workers:
            problems.append(f"trial.batch_size: {cfg.batch_size} sequences do not split evenly over "
                            f"resources.workers={resources.workers}")
        elif cfg.micro_batch_size and share % cfg.micro_batch_size:
            problems.append(f"trial.micro_batch_size: {cfg.micro_batch_size} does not divide the {share} sequences "
                            f"each of resources.workers={resources.workers} takes of batch_size={cfg.batch_size}")
    if scheduler.type not in ("tev", "none"):
        problems.append(f"scheduler.type: expected tev or none, got {scheduler.type!r}")

    lr = next((p for p in params if p.name == "lr"), None)
    if strategy in ("max_lr", "scale"):
        if lr is None or lr.kind != "loguniform":
            problems.append(f"params.lr: the {strategy} strategy needs `lr: {{loguniform: [low, high]}}`, "
                            "the range it brackets")
        if any(p.name != "lr" for p in params):
            problems.append(f"params: the {strategy} strategy searches lr alone; fix the others under `trial`"
                            + (" or in `scale.sizes`" if strategy == "scale" else ""))
    elif strategy == "tune":
        if tune_.seeds > 1 and any(p.name == "seed" for p in params):
            problems.append("params.seed: with tune.seeds each configuration already runs at several seeds")
        if not any(p.kind in ("loguniform", "uniform", "int", "choice") for p in params):
            problems.append("params: the tune strategy needs at least one range or choice to sample")
        if any(p.kind == "grid" for p in params):
            problems.append("params: the tune strategy samples; use choice instead of grid")
    elif strategy == "sweep":
        if not params or any(p.kind != "grid" for p in params):
            problems.append("params: the sweep strategy needs every parameter as a grid (`{grid: [...]}`)")

    tracking_uri = raw.get("tracking_uri", DEFAULT_TRACKING_URI)
    if not isinstance(tracking_uri, str) or not tracking_uri:
        problems.append(f"tracking_uri: expected a URI, got {tracking_uri!r}")
    storage = raw.get("storage", "~/tunestab_results")
    if not isinstance(storage, str) or not storage:
        problems.append(f"storage: expected a folder, got {storage!r}")
    train_storage = raw.get("train_storage", "")
    if not isinstance(train_storage, str):
        problems.append(f"train_storage: expected a folder or a URI such as s3://bucket/prefix, got {train_storage!r}")

    if problems:
        raise SpecError(problems, where)
    return Space(name=name, strategy=strategy, variants=tuple(variants), trial=dict(trial),
                 params=tuple(params), description=description, max_lr=max_lr, scale=scale, tune=tune_,
                 resources=resources, scheduler=scheduler, tracking_uri=tracking_uri, storage=storage,
                 train_storage=train_storage, source=source)
