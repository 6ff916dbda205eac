"""Everything a run checks before it writes or spends anything; ``--dry-run`` runs exactly this.

:func:`preflight` is called by ``privimage run`` (and ``--dry-run``) before a run directory exists, and by the
stage commands before they take a run directory's lock-protected files any further. In order:

1. the config: already checked when it was built (:mod:`privimage.config`: types, ranges, names);
2. the device: ``--device cuda`` on a machine without a GPU is refused here;
3. the data specs: :func:`privimage.data.inspect_spec` (the files exist, their headers or metadata give the
   expected shape; class counts, channels and sizes where they are cheap to know);
4. what the data and the config must agree on: the same channels in sensitive and public images, the held-out
   split's classes, ``query.top_k`` and ``query.top_n`` against the public classes, ``data.pad_to`` against
   the images' side, the expected batch against N;
5. privacy: δ < 1/n (:func:`check_delta`), a budget that can be planned (σ calibrated for the query and the
   fine-tune together), the number of steps;
6. the output folder: ``--out`` is a folder or can be made one (no file in its way, writable); checked first,
   as it is the cheapest.

Each failure is a :class:`~privimage.errors.PrivimageError` naming the setting, flag or file.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from privimage.config import RunConfig
from privimage.errors import ConfigError, DataError, PrivacyError

__all__ = ["KNOWN_SIZES", "Preflight", "check_delta", "describe_plan", "large_delta_note", "plan_budget",
           "preflight"]

# Sizes of well-known training splits, so --dry-run can report σ and steps without reading every file.
KNOWN_SIZES = {("cifar10", "train"): 50_000, ("celeba", "train"): 162_770}
SPLITS = ("sensitive", "sensitive_test", "public")


@dataclass
class Preflight:
    """What :func:`preflight` found: the device, the data's shape, and the planned budget (if planned)."""

    device: str
    specs: dict = field(default_factory=dict)       # split -> privimage.data.SpecInfo
    num_sensitive: int | None = None
    num_sensitive_from: str | None = None
    budget: object | None = None                    # privimage.engine.PrivacyBudget

    def checked(self) -> dict:
        """What was checked, for ``--dry-run``'s output."""
        return {"device": self.device, **{f"data.{k}": v.checked for k, v in self.specs.items()}}


def preflight(cfg: RunConfig, *, splits=SPLITS, plan: bool = True, out: str | os.PathLike | None = None,
              load_sizes: bool = True) -> Preflight:
    """The checks of the module docstring for ``cfg``; returns what they found.

    Args:
        splits: the data specs to inspect (a stage checks the ones it reads).
        plan: plan the budget (needs the sensitive split's size: from ``size=``, the standard size of a
            well-known split, the files' headers, or, with ``load_sizes``, by loading the split).
        out: the folder a new run directory goes into (``None``: not making one).
    """
    from privimage.data import inspect_spec
    from privimage.train import resolve_device

    if out is not None:
        _check_out(Path(out))
    found = Preflight(device=str(resolve_device(cfg.device)))
    for which in splits:
        try:
            found.specs[which] = inspect_spec(getattr(cfg.data, which), which)
        except DataError as err:
            raise DataError(f"data.{which}: {err}") from None
    _agree(cfg, found.specs)
    if plan:
        found.num_sensitive, found.num_sensitive_from = sensitive_size(cfg, found.specs.get("sensitive"), load_sizes)
        found.budget = plan_budget(cfg, found.num_sensitive)
    return found


def _agree(cfg: RunConfig, specs: dict) -> None:
    sens, test, pub = specs.get("sensitive"), specs.get("sensitive_test"), specs.get("public")
    if sens and pub and sens.channels and pub.channels and sens.channels != pub.channels:
        raise ConfigError(f"data.sensitive has {sens.channels}-channel images but data.public {pub.channels}-channel "
                          f"ones: the UNet pre-trained on the public images could not be fine-tuned on the sensitive.")
    if sens and test and sens.num_classes and test.num_classes and sens.num_classes != test.num_classes:
        raise ConfigError(f"data.sensitive_test has {test.num_classes} classes but data.sensitive {sens.num_classes}: "
                          f"the held-out split must be of the same classes.")
    if pub and pub.num_classes:
        q = cfg.query
        if q.top_k > pub.num_classes:
            raise ConfigError(f"query.top_k={q.top_k} exceeds the {pub.num_classes} public classes of "
                              f"{cfg.data.public!r}.")
        if sens and sens.num_classes:
            per_class = max(1, q.top_n // sens.num_classes)
            if per_class * sens.num_classes > pub.num_classes:
                raise ConfigError(f"query.top_n={q.top_n}: {sens.num_classes} sensitive classes x {per_class} public "
                                  f"classes each exceed the {pub.num_classes} public classes of {cfg.data.public!r}.")
    if cfg.data.pad_to:
        for which, info in specs.items():
            if info.resolution and info.resolution > cfg.data.pad_to:
                raise ConfigError(f"data.pad_to={cfg.data.pad_to} is smaller than the {info.resolution}x"
                                  f"{info.resolution} images of data.{which}.")


def sensitive_size(cfg: RunConfig, info=None, load: bool = True) -> tuple[int, str]:
    """The number of sensitive images, and where it came from: the spec's ``size=``, the standard size of a
    well-known split, the files' headers (``info``, from :func:`privimage.data.inspect_spec`), else, with
    ``load``, the loaded data (``run_pipeline`` itself plans with the loaded data)."""
    from privimage.data import resolve_spec

    spec = resolve_spec(cfg.data.sensitive, "sensitive")
    if "size" in spec:
        return spec["size"], "size= in the data spec"
    if (spec["name"], spec["split"]) in KNOWN_SIZES:
        return KNOWN_SIZES[(spec["name"], spec["split"])], f"the standard size of {spec['name']}:{spec['split']}"
    if info is not None and info.size is not None:
        return info.size, "the data files' headers"
    if not load:
        raise DataError(f"data.sensitive {cfg.data.sensitive!r}: its size is not known without loading it.")
    from privimage.pipeline import load_split

    return len(load_split(cfg, "sensitive")), "the loaded data"


def check_delta(delta: float, n: int, *, allow: bool = False) -> str | None:
    """Refuse δ ≥ 1/n (:class:`PrivacyError`), unless ``allow``: then return the note every report carries."""
    if n < 1:
        raise DataError(f"The sensitive data set is empty (n={n}).")
    note = large_delta_note(delta, n)
    if note is not None and not allow:
        raise PrivacyError(
            f"delta={delta:g} is not below 1/n = {1 / n:.3g} for n={n} sensitive images: (epsilon, delta)-DP with "
            f"delta >= 1/n is met by a mechanism that publishes a random image outright, so it promises nothing. "
            f"Use delta <= 1/(10 n) = {1 / (10 * n):.2g} (the usual advice), or allow_large_delta "
            f"(--allow-large-delta) for an experiment, which every report will then state.")
    return note


def large_delta_note(delta: float, n: int | None) -> str | None:
    """The warning for δ ≥ 1/n that reports and the release's privacy statement carry (None if δ < 1/n)."""
    if n is None or n < 1 or delta < 1 / n:
        return None
    return (f"delta={delta:g} is not below 1/n = {1 / n:.3g} (n={n}); it was allowed by allow_large_delta for an "
            f"experiment. A delta this large permits publishing a sensitive image outright: this is NOT a meaningful "
            f"privacy guarantee.")


def plan_budget(cfg: RunConfig, num_sensitive: int):
    """The run's PrivacyBudget (a fresh one, nothing spent): the query's σ from its ε share, the fine-tune's σ
    calibrated on the rest (``cfg.non_private``: both with σ = 0, ε = ∞)."""
    from privimage.engine import PrivacyBudget

    check_delta(cfg.delta, num_sensitive, allow=cfg.allow_large_delta)
    q = cfg.finetune.sample_rate(num_sensitive)
    steps = cfg.finetune.steps(num_sensitive)
    if cfg.non_private:  # the sweep's reference point: sigma = 0, epsilon = inf (labelled everywhere)
        from privimage.privacy import plan_non_private_budget

        return plan_non_private_budget(delta=cfg.delta, sample_rate=q, steps=steps)
    try:
        state = _planned(cfg.epsilon, cfg.delta, q, steps, cfg.query.epsilon_fraction)
    except (ValueError, ArithmeticError) as err:  # an impossible budget (epsilon too small for the steps, ...)
        raise PrivacyError(f"epsilon={cfg.epsilon:g}, delta={cfg.delta:g} with {steps} steps at sample rate {q:.4g}: "
                           f"{err}") from None
    return PrivacyBudget.from_state_dict(state)


@functools.lru_cache(maxsize=32)
def _planned(epsilon: float, delta: float, sample_rate: float, steps: int, query_fraction: float) -> dict:
    """The calibrated plan's state (calibration is deterministic and slow: a dry run followed by the run, or a
    sweep over the same settings, calibrates once per process)."""
    from privimage.privacy import plan_privimage_budget

    return plan_privimage_budget(epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                                 query_epsilon_fraction=query_fraction).state_dict()


def describe_plan(cfg: RunConfig, budget, num_sensitive: int) -> dict:
    """plan.json: the planned mechanisms in numbers (σ, q, steps, expected batch, ε)."""
    from privimage.privacy import FINETUNE, NON_PRIVATE_NOTE, QUERY

    ft = budget.plan[FINETUNE]
    return {"num_sensitive": num_sensitive, "epsilon": cfg.epsilon, "delta": cfg.delta,
            "query_noise_multiplier": budget.plan[QUERY].noise_multiplier,
            "query_epsilon_alone": budget.epsilon_of(QUERY).upper,
            "finetune_noise_multiplier": ft.noise_multiplier, "finetune_sample_rate": ft.sample_rate,
            "finetune_steps": ft.count, "expected_batch_size": ft.sample_rate * num_sensitive,
            "epsilon_planned": budget.epsilon_planned().upper,
            **({"large_delta": note} if (note := large_delta_note(cfg.delta, num_sensitive)) else {}),
            **({"epsilon": budget.epsilon, "non_private": NON_PRIVATE_NOTE} if cfg.non_private else {})}


def _check_out(out: Path) -> None:
    from privimage.io import file_in_the_way

    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ConfigError(f"--out {out}: {blocker} is a file, not a folder; choose another --out.")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable (read-only file system or permissions).")
