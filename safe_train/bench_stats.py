"""Statistics and reports of the scaled benchmark: mean ± standard error over seeds, one table per scale.

Pure functions on plain dicts, so they can be tested without training and reused by any runner:

- :func:`mean_se` — mean and standard error of the mean of one metric over seeds;
- :func:`aggregate` — per-run rows (one per seed) → one row per cell (scale × attack × rate × defense);
- :func:`lowest_learned_rate` — the lowest poison rate at which a defense (``none``) learns an attack;
- :func:`write_results` — ``results.json``, ``results.csv`` and ``results.md`` (the table a README quotes);
- :func:`plot_asr_vs_rate`, :func:`plot_accuracy_vs_asr` — the PNG plots.

A per-run row holds at least the cell keys (``scale``, ``attack``, ``poison_rate``, ``defense``), ``seed``,
and the metrics ``clean_top1``, ``asr``, ``retrieval_r1`` (mean of image→text and text→image R@1),
``targeted_success`` and ``wall_seconds``; a metric may be ``None`` (not measured, e.g. targeted success
of a backdoor attack). All rates and metrics are fractions; the Markdown table shows percent.

Missing values: ``None`` and NaN are left out of a mean and counted (``<metric>_n`` in a cell says how
many seeds gave the metric). With one value the standard error is NaN (undefined, not zero): tables print
"—" for it and JSON/CSV write null / an empty field.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

METRICS = ("clean_top1", "asr", "retrieval_r1", "targeted_success", "wall_seconds")
# Aggregated like METRICS when the runs carry them (None when absent): the scene corpus's ASR on held-out
# scenes; a runner without scenes need not name it.
OPTIONAL_METRICS = ("asr_scenes",)
CELL_KEYS = ("scale", "attack", "poison_rate", "defense")
SPLITS = ("test", "validation")
# Fields of the runs copied into their cell when every seed agrees (and an error when they do not):
# a cell is one setting, run with several seeds.
CARRIED = ("split", "params", "target")

__all__ = [
    "CELL_KEYS",
    "METRICS",
    "LearnedRate",
    "aggregate",
    "format_markdown",
    "lowest_learned_rate",
    "mean_se",
    "plot_accuracy_vs_asr",
    "plot_asr_vs_rate",
    "plot_curves",
    "write_results",
]


# ------------------------------------------------------------------------------------- statistics


def _finite(values: Iterable[Any]) -> list[float]:
    """The values as floats, without None and NaN; infinity is an error (no metric can be infinite)."""
    out = []
    for v in values:
        if v is None:
            continue
        x = float(v)
        if math.isnan(x):
            continue
        if math.isinf(x):
            raise ValueError(f"infinite value {v!r} among the values to average")
        out.append(x)
    return out


def mean_se(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and standard error of the mean: sample standard deviation (ddof=1) / sqrt(n).

    None and NaN values are ignored (n counts the others). One value gives ``(value, nan)``: the
    standard error of a single seed is undefined, not zero. No value gives ``(nan, nan)``.
    """
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    variance = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(variance) / math.sqrt(n)


def _same(a: Any, b: Any) -> bool:
    """Equality for cell keys: 0.001 == 0.0010000000000000002 (a rate parsed twice), NaN == NaN."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            return False
        return (math.isnan(fa) and math.isnan(fb)) or math.isclose(fa, fb, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def aggregate(
    rows: Iterable[Mapping[str, Any]], keys: Sequence[str] = CELL_KEYS
) -> list[dict[str, Any]]:
    """One row per cell (the distinct values of ``keys``), in order of first appearance.

    Each cell has the ``keys``, ``n_seeds``, ``seeds`` (sorted), ``<metric>_mean``, ``<metric>_se`` and
    ``<metric>_n`` (seeds that gave the metric) for ``clean_top1``, ``asr``, ``retrieval_r1``,
    ``targeted_success`` and ``wall_seconds``, and the fields ``split``, ``params``, ``target`` when the
    runs carry them. Raises ValueError for a row without a key, ``seed`` or metric (``None`` is fine), for
    a seed that appears twice in one cell, and for runs of one cell that disagree on a carried field.
    """
    keys = tuple(keys)
    groups: list[tuple[tuple[Any, ...], list[Mapping[str, Any]]]] = []
    for number, row in enumerate(rows):
        missing = [k for k in (*keys, "seed", *METRICS) if k not in row]
        if missing:
            raise ValueError(f"run row {number} has no {', '.join(missing)} (a metric may be None, not absent)")
        key = tuple(row[k] for k in keys)
        for existing, members in groups:
            if all(_same(a, b) for a, b in zip(existing, key, strict=True)):
                members.append(row)
                break
        else:
            groups.append((key, [row]))

    cells = []
    for key, members in groups:
        cell: dict[str, Any] = dict(zip(keys, key, strict=True))
        seeds = [m["seed"] for m in members]
        if len(set(seeds)) != len(seeds):
            repeated = sorted({s for s in seeds if seeds.count(s) > 1})
            raise ValueError(f"cell {cell} has seed(s) {repeated} more than once: each seed is one run")
        cell["n_seeds"] = len(members)
        cell["seeds"] = sorted(seeds)
        for metric in (*METRICS, *OPTIONAL_METRICS):
            values = [m.get(metric) for m in members]
            cell[f"{metric}_mean"], cell[f"{metric}_se"] = mean_se(values)
            cell[f"{metric}_n"] = len(_finite(values))
        for name in CARRIED:
            if not any(name in m for m in members):
                continue
            first = members[0].get(name)
            if any(m.get(name) != first for m in members[1:]):
                raise ValueError(f"the runs of cell {cell} disagree on {name!r}: a cell is one setting")
            cell[name] = first
        cells.append(cell)
    return cells


class LearnedRate(NamedTuple):
    """The answer of :func:`lowest_learned_rate`: ``rate`` (None: not learned at any tried rate), the
    rates ``tried`` (ascending) and the mean of ``metric`` at each (NaN where none was measured)."""

    attack: str
    defense: str
    metric: str
    threshold: float
    rate: float | None
    tried: tuple[float, ...]
    means: tuple[float, ...]

    def describe(self) -> str:
        """One line for a report, e.g. ``badnets: none learns it from 0.25% (mean ASR 85.3% >= 80.0%); tried ...``."""
        what = _METRIC_NAMES.get(self.metric, self.metric)
        tried = ", ".join(f"{_rate(r)} ({_pct(a)})" for r, a in zip(self.tried, self.means, strict=True))
        if not self.tried:
            return f"{self.attack}: no {self.defense} cell with a positive poison rate"
        if self.rate is None:
            return (f"{self.attack}: {self.defense} does not learn it (mean {what} < {_pct(self.threshold)}) "
                    f"at any tried rate: {tried}")
        reached = self.means[self.tried.index(self.rate)]
        return (f"{self.attack}: {self.defense} learns it from {_rate(self.rate)} (mean {what} {_pct(reached)} "
                f">= {_pct(self.threshold)}); tried {tried}")

    def as_dict(self) -> dict[str, Any]:
        return {**self._asdict(), "tried": list(self.tried), "means": [_json_number(a) for a in self.means]}


_METRIC_NAMES = {"asr": "ASR", "targeted_success": "targeted success"}


def lowest_learned_rate(
    cells: Iterable[Mapping[str, Any]],
    attack: str,
    defense: str = "none",
    threshold: float = 0.8,
    scale: str | None = None,
    metric: str | None = None,
) -> LearnedRate:
    """The lowest poison rate whose cell (``attack``, ``defense``) has a mean ``metric`` >= ``threshold``.

    ``metric``: ``"asr"``, except for the ``targeted`` attack (no trigger, hence no ASR), where it is
    ``"targeted_success"``. Rates <= 0 (clean runs) are not tried; a cell without the metric counts as
    tried and not learned. ``rate`` is None when no tried rate reaches the threshold (a finding: the
    model cannot learn the attack there). Cells of several scales need ``scale``.
    """
    metric = metric or ("targeted_success" if attack == "targeted" else "asr")
    chosen = [c for c in cells if c.get("attack") == attack and c.get("defense") == defense
              and (scale is None or c.get("scale") == scale)]
    scales = {c.get("scale") for c in chosen}
    if len(scales) > 1:
        raise ValueError(f"cells of several scales {sorted(map(str, scales))}: pass scale=")
    by_rate: dict[float, float] = {}
    for c in chosen:
        rate = float(c["poison_rate"])
        if rate <= 0:
            continue
        if rate in by_rate:
            raise ValueError(f"two {attack} x {defense} cells at rate {rate}")
        value = c.get(f"{metric}_mean")
        by_rate[rate] = math.nan if value is None else float(value)
    tried = tuple(sorted(by_rate))
    means = tuple(by_rate[r] for r in tried)
    learned = next((r for r, a in zip(tried, means, strict=True) if not math.isnan(a) and a >= threshold), None)
    return LearnedRate(attack, defense, metric, threshold, learned, tried, means)


# ----------------------------------------------------------------------------------------- output


def _json_number(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}%"


def _rate(rate: float) -> str:
    """0.0005 → "0.05%", 0.01 → "1%", 0.0025 → "0.25%"."""
    return f"{100 * rate:.4g}%"


def _mean_se_cell(cell: Mapping[str, Any], metric: str) -> str:
    """"85.3 ± 2.1" in percent; "85.3 ± —" with one seed; "—" when not measured; "(n=2)" when seeds miss it."""
    mean, se, n = cell.get(f"{metric}_mean"), cell.get(f"{metric}_se"), cell.get(f"{metric}_n")
    if mean is None or math.isnan(mean):
        return "—"
    text = f"{100 * mean:.1f} ± {'—' if se is None or math.isnan(se) else f'{100 * se:.1f}'}"
    if n is not None and n < cell.get("n_seeds", n):
        text += f" (n={n})"
    return text


def _wall(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def _ordered(cells: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Attack and defense in order of first appearance, rates ascending."""
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    return sorted(cells, key=lambda c: (attacks.index(c["attack"]), float(c["poison_rate"]),
                                        defenses.index(c["defense"])))


def _split_note(split: str) -> str:
    if split == "test":
        return ("Numbers on the **test** split (used only for these final numbers); every recipe and threshold "
                "was chosen on the validation split.")
    return ("Numbers on the **validation** split, where recipes and thresholds are chosen; the final numbers "
            "are the test split's.")


def format_markdown(cells: Sequence[Mapping[str, Any]], scale: str, split: str) -> str:
    """The Markdown table (attack × rate × defense), headed by the split and the statistics it shows."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    seeds = sorted({n for c in cells for n in [c.get("n_seeds")] if n is not None})
    lines = [
        f"Scale `{scale}`. {_split_note(split)} Each cell: mean ± standard error over seeds, in percent "
        f"(SE = sample standard deviation / √n; — where one seed ran or the metric does not apply); "
        f"seeds per cell: {', '.join(map(str, seeds)) or '—'}. R@1 = mean of image→text and text→image R@1. "
        "Wall time: mean per run.",
        "",
        "| attack | poison rate | defense | seeds | clean top-1 | R@1 | ASR | ASR (scenes) | targeted success "
        "| wall time |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in _ordered(cells):
        lines.append(
            f"| {c['attack']} | {_rate(float(c['poison_rate']))} | {c['defense']} | {c.get('n_seeds', '—')} | "
            f"{_mean_se_cell(c, 'clean_top1')} | {_mean_se_cell(c, 'retrieval_r1')} | {_mean_se_cell(c, 'asr')} | "
            f"{_mean_se_cell(c, 'asr_scenes')} | "
            f"{_mean_se_cell(c, 'targeted_success')} | {_wall(c.get('wall_seconds_mean'))} |"
        )
    return "\n".join(lines) + "\n"


_CSV_HEAD = ("scale", "split", "attack", "poison_rate", "defense", "n_seeds", "seeds")


def write_results(
    cells: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    scale: str,
    *,
    split: str = "test",
    learned: Iterable[LearnedRate] = (),
    command: str | None = None,
) -> str:
    """Write ``results.json``, ``results.csv`` and ``results.md`` of the cells of ``scale`` into ``out_dir``.

    ``split``: "test" or "validation", the split the numbers come from; it heads the Markdown and is a
    field of every JSON/CSV row. ``learned`` (from :func:`lowest_learned_rate`) and ``command`` (what
    produced the table) are added to the JSON and the Markdown. Returns the Markdown without its title:
    the note on split and statistics, the table and the lowest learned rates, ready to quote.
    JSON: ``{"scale", "split", "command", "rows": [...], "lowest_learned_rates": [...]}`` (NaN → null).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = []
    for c in cells:
        if c.get("scale", scale) != scale:
            continue
        if c.get("split", split) != split:
            raise ValueError(f"cell {c.get('attack')} x {c.get('defense')} comes from the {c['split']} split, "
                             f"not {split}")
        rows.append({**c, "scale": scale, "split": split})
    if not rows:
        raise ValueError(f"no cells of scale {scale!r}")
    rows = [dict(r) for r in _ordered(rows)]
    learned = list(learned)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    document = {
        "scale": scale,
        "split": split,
        "command": command,
        "rows": [{k: _json_number(v) for k, v in r.items()} for r in rows],
        "lowest_learned_rates": [lr.as_dict() for lr in learned],
    }
    (out / "results.json").write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")

    columns = list(_CSV_HEAD) + [f"{m}_{s}" for m in (*METRICS, *OPTIONAL_METRICS) for s in ("mean", "se", "n")]
    columns += sorted({k for r in rows for k in r} - set(columns))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_csv_value(r.get(k)) for k in columns])

    body = format_markdown(rows, scale, split)
    if learned:
        body += "\nLowest poison rate at which each attack is learned (mean ASR over the seeds run):\n\n"
        body += "".join(f"- {lr.describe()}\n" for lr in learned)
    title = f"# Benchmark results: scale `{scale}`, {split} split\n\n"
    ran = f"Command: `{command}`\n\n" if command else ""
    (out / "results.md").write_text(title + ran + body)
    return body


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v):
        return ";".join(map(str, v))
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


# ------------------------------------------------------------------------------------------ plots


def _pyplot():
    # deferred: matplotlib takes about half a second to import and only the plots need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nan_to(x: Any, default: float) -> float:
    return default if x is None or math.isnan(float(x)) else float(x)


def plot_asr_vs_rate(cells: Sequence[Mapping[str, Any]], path: str | os.PathLike, threshold: float = 0.8) -> None:
    """ASR (mean ± SE over seeds) against poison rate (log axis), one line per defense, one panel per attack.

    Cells with a rate <= 0 or without an ASR are left out (a log axis has no 0); the dashed line is
    ``threshold``, the ASR at which an attack counts as learned.
    """
    plt = _pyplot()
    cells = [c for c in _ordered(list(cells)) if float(c["poison_rate"]) > 0
             and not math.isnan(_nan_to(c.get("asr_mean"), math.nan))]
    if not cells:
        raise ValueError("no cell with a positive poison rate and an ASR to plot")
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    scales = list(dict.fromkeys(c.get("scale") for c in cells))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.8), sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        for d, defense in enumerate(defenses):
            for scale in scales:
                line = [c for c in cells if c["attack"] == attack and c["defense"] == defense
                        and c.get("scale") == scale]
                if not line:
                    continue
                label = defense if len(scales) == 1 else f"{defense} ({scale})"
                ax.errorbar([float(c["poison_rate"]) for c in line], [100 * c["asr_mean"] for c in line],
                            yerr=[100 * _nan_to(c.get("asr_se"), 0.0) for c in line], marker="o", capsize=3,
                            color=colours(d % 10), label=label)
        ax.axhline(100 * threshold, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set(title=attack, xlabel="poison rate", ylim=(-2, 102))
        rates = sorted({float(c["poison_rate"]) for c in cells if c["attack"] == attack})
        ax.set_xticks(rates, [_rate(r) for r in rates], fontsize=8)
        ax.xaxis.set_minor_locator(plt.NullLocator())
    axes[0][0].set_ylabel("ASR (%), mean ± SE over seeds")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_asr(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Clean top-1 against ASR, one point per run (seed), coloured by defense, marker by attack.

    Runs without an ASR or a clean accuracy are left out.
    """
    plt = _pyplot()
    runs = [r for r in rows if not math.isnan(_nan_to(r.get("asr"), math.nan))
            and not math.isnan(_nan_to(r.get("clean_top1"), math.nan))]
    if not runs:
        raise ValueError("no run with both an ASR and a clean accuracy to plot")
    defenses = list(dict.fromkeys(r["defense"] for r in runs))
    attacks = list(dict.fromkeys(r.get("attack") for r in runs))
    markers = "osD^vP*Xh<>"
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for d, defense in enumerate(defenses):
        for a, attack in enumerate(attacks):
            pts = [r for r in runs if r["defense"] == defense and r.get("attack") == attack]
            if not pts:
                continue
            ax.scatter([100 * float(r["asr"]) for r in pts], [100 * float(r["clean_top1"]) for r in pts],
                       color=colours(d % 10), marker=markers[a % len(markers)], alpha=0.8,
                       label=defense if len(attacks) == 1 else f"{defense} / {attack}")
    ax.set(xlabel="ASR (%)", ylabel="clean zero-shot top-1 (%)", xlim=(-2, 102),
           title="Clean accuracy against ASR (one point per run)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, max_legend: int = 16) -> None:
    """Per-epoch clean top-1 and ASR of every run, from each row's ``history`` (the in-training evaluations)."""
    plt = _pyplot()
    fig, (ax_asr, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        history = r.get("history") or []
        epochs = [h["epoch"] for h in history]
        label = f"{r.get('attack')} {_rate(float(r.get('poison_rate', 0)))} {r.get('defense')} s{r.get('seed')}"
        if any(h.get("asr") is not None for h in history):
            ax_asr.plot(epochs, [100 * _nan_to(h.get("asr"), 0.0) for h in history], marker=".", label=label)
        ax_acc.plot(epochs, [100 * _nan_to(h.get("clean_top1"), 0.0) for h in history], marker=".", label=label)
    ax_asr.set(title="ASR (%) during training", xlabel="epoch", ylim=(-2, 102))
    ax_acc.set(title="Clean zero-shot top-1 (%) during training", xlabel="epoch", ylim=(-2, 102))
    if 0 < len(rows) <= max_legend:
        ax_acc.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
