"""Statistical comparison of methods over blocks (Demsar 2006; Benavoli et al. 2016).

A comparison starts from a block matrix: one row per block (a data set, or a task x seed of
one suite), one column per method, each cell one score. Within every block the methods are
ranked, 1 = best (ties share the average rank). Then:

- Friedman's test of equal average ranks ``R_j`` over ``N`` blocks and ``k`` methods
  (Demsar 2006, Sec. 3.2.2, without a correction for ties):
  ``chi2_F = 12 N / (k (k + 1)) * (sum_j R_j^2 - k (k + 1)^2 / 4)``, chi-squared with
  ``k - 1`` degrees of freedom. SciPy's ``friedmanchisquare`` (which corrects for ties) is
  reported next to it; when every block ties all methods it is 0/0, left NaN and said to be
  undefined.
- Iman and Davenport's correction: ``F_F = (N - 1) chi2_F / (N (k - 1) - chi2_F)``, F
  distributed with ``k - 1`` and ``(k - 1)(N - 1)`` degrees of freedom.
- Nemenyi's critical difference ``CD = q_alpha sqrt(k (k + 1) / (6 N))`` with ``q_alpha`` the
  studentized range quantile (infinite degrees of freedom) divided by ``sqrt(2)``; two
  methods differ when their average ranks differ by more than ``CD``. Pairwise p-values come
  from scikit-posthocs' ``posthoc_nemenyi_friedman``.
- Wilcoxon's signed-rank test of every method against a reference over the blocks, with
  Holm's step-down correction over the ``k - 1`` comparisons (Benavoli et al., JMLR 2016,
  advise these pairwise tests over mean-rank post-hoc tests). As in Demsar 2006, Sec. 3.1.3,
  the ranks of zero differences are split evenly between ``R+`` and ``R-`` (ties support the
  null hypothesis). Effect sizes: the mean difference and the matched-pairs rank-biserial
  correlation ``r = (R+ - R-) / (R+ + R-)`` (Kerby 2014), where ``R+`` sums the ranks of
  ``|d|`` over the blocks where the method beats the reference: ``r = 1`` means it wins
  every block.
- A paired bootstrap confidence interval of the difference in mean AUROC between two
  methods, resampling the test items (the same resample for both methods and every seed).
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scikit_posthocs
from scipy import stats
from statsmodels.stats.multitest import multipletests

DIRECTIONS = ("maximize", "minimize")
_BOOTSTRAP_BATCH_CELLS = 4_000_000
"""Resamples are evaluated in batches of at most this many (resample, item, task, seed) cells."""


@dataclass(frozen=True)
class BlockMatrix:
    """Scores of every method on every complete block, for one metric.

    Attributes:
        metric: what is compared (a metric key, or a family such as ``auroc`` whose keys
            ``auroc/<task>`` are the tasks).
        values: rows are blocks, columns are methods.
        direction: ``"maximize"`` or ``"minimize"``: which scores are better.
        design: how blocks were formed, in words.
        dropped: the blocks left out because some method had no score there, each with the
            methods it lacked.
    """

    metric: str
    values: pd.DataFrame
    direction: str
    design: str
    dropped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")

    @property
    def n_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def methods(self) -> list[str]:
        return [str(m) for m in self.values.columns]

    def oriented(self) -> pd.DataFrame:
        """The scores signed so that higher is better (negated for ``minimize``)."""
        return self.values if self.direction == "maximize" else -self.values


def task_of(key: str) -> str:
    """The task a metric key measures: what follows the first ``/`` (``auroc/Hernia`` -> ``Hernia``)."""
    return key.split("/", 1)[1] if "/" in key else ""


def family_of(key: str) -> str:
    """The metric a key is one task's value of: what precedes the first ``/`` (``auroc/Hernia`` -> ``auroc``)."""
    return key.split("/", 1)[0]


def comparable_metrics(keys: Iterable[str]) -> list[str]:
    """What can be compared: every family of per-task keys (``auroc``) and every key without a task."""
    return sorted({family_of(k) if "/" in k else k for k in keys})


def keys_of(metric: str, keys: Iterable[str]) -> list[str]:
    """The keys ``metric`` stands for: itself, or every ``<metric>/<task>`` when it names a family."""
    return sorted(k for k in keys if k == metric or k.startswith(metric + "/"))


def block_matrix(long: pd.DataFrame, metric: str, direction: str) -> BlockMatrix:
    """Blocks x methods scores of ``metric`` from long-format rows (``method, dataset, seed, metric, value``).

    ``metric`` is a key (``mean_auroc``) or a family (``auroc``: every ``auroc/<task>`` key,
    each task a block). With one data set a block is a (task, seed) pair, so every seed of
    every task counts; with several data sets a block is a (data set, task) pair scored by
    the mean over seeds (Demsar 2006, Sec. 3.2.3: repeated runs on one data set are not
    independent samples). A block where some method has no score is dropped and named.
    """
    rows = long[long["metric"].isin(keys_of(metric, long["metric"].unique()))].assign(
        task=lambda frame: frame["metric"].map(task_of)
    )
    if rows.empty:
        raise ValueError(f"no values of {metric!r} (as a key or a family of <{metric}>/<task> keys)")
    datasets = sorted(rows["dataset"].unique())
    methods = list(dict.fromkeys(rows["method"]))
    has_tasks = bool((rows["task"] != "").any())
    if len(datasets) == 1:
        index = ["task", "seed"] if has_tasks else ["seed"]
        design = ("tasks x seeds" if has_tasks else "seeds") + f" of {datasets[0]}"
    else:
        index = ["dataset", "task"] if has_tasks else ["dataset"]
        design = ("data sets x tasks" if has_tasks else "data sets") + ", each the mean over its seeds"
    wide = rows.pivot_table(index=index, columns="method", values="value", aggfunc="mean").reindex(columns=methods)
    incomplete = wide.isna().any(axis=1)
    dropped = tuple(
        f"{_block_name(wide.index.names, block)} (no {', '.join(wide.columns[wide.loc[block].isna()])})"
        for block in wide.index[incomplete]
    )
    complete = wide[~incomplete]
    complete.columns = [str(m) for m in complete.columns]
    return BlockMatrix(metric, complete, direction, design, dropped)


def _block_name(levels: Sequence[str], block: Any) -> str:
    """``task Hernia, seed 2`` from the index level names and one index entry."""
    parts = block if isinstance(block, tuple) else (block,)
    return ", ".join(f"{level} {part}" for level, part in zip(levels, parts))


def ranks(blocks: BlockMatrix) -> pd.DataFrame:
    """Rank of each method within each block: 1 = best, ties get their average rank."""
    return blocks.oriented().rank(axis=1, ascending=False, method="average")


def average_ranks(blocks: BlockMatrix) -> pd.Series:
    """Mean over blocks of each method's rank (lower is better)."""
    return ranks(blocks).mean(axis=0)


def tied_blocks(blocks: BlockMatrix) -> int:
    """The number of blocks in which every method has the same score (a complete tie)."""
    return int((blocks.values.nunique(axis=1) <= 1).sum())


def friedman(blocks: BlockMatrix) -> dict[str, Any]:
    """Friedman's chi-squared of the average ranks (no tie correction) and SciPy's tie-corrected one.

    ``chi2_F = 12 N / (k (k + 1)) (sum_j R_j^2 - k (k + 1)^2 / 4)`` (Demsar 2006, Sec. 3.2.2),
    p-value from the chi-squared distribution with ``k - 1`` degrees of freedom. When every
    block is a complete tie, the tie correction divides 0 by 0: the tie-corrected statistic
    and p-value are NaN and ``tie_corrected_undefined`` says why.
    """
    n, k = blocks.values.shape
    mean_ranks = average_ranks(blocks).to_numpy()
    statistic = 12.0 * n / (k * (k + 1)) * (float(np.sum(mean_ranks**2)) - k * (k + 1) ** 2 / 4.0)
    statistic = max(statistic, 0.0)  # rounding can leave -1e-15 when all ranks are equal
    result: dict[str, Any] = {"statistic": statistic, "pvalue": float(stats.chi2.sf(statistic, k - 1)), "df": k - 1}
    if tied_blocks(blocks) == n:
        result["tie_corrected_statistic"] = result["tie_corrected_pvalue"] = math.nan
        result["tie_corrected_undefined"] = (
            f"every one of the {n} blocks ties all {k} methods, so SciPy's tie correction divides 0 by 0"
        )
    else:
        corrected = stats.friedmanchisquare(*(blocks.values[m].to_numpy() for m in blocks.values.columns))
        result["tie_corrected_statistic"] = float(corrected.statistic)
        result["tie_corrected_pvalue"] = float(corrected.pvalue)
    return result


def iman_davenport(chi2_f: float, n_blocks: int, k: int) -> dict[str, float]:
    """Iman-Davenport ``F_F = (N - 1) chi2_F / (N (k - 1) - chi2_F)`` with its p-value.

    F distributed with ``k - 1`` and ``(k - 1)(N - 1)`` degrees of freedom (Demsar 2006,
    Sec. 3.2.2). When every block ranks the methods identically the denominator is 0 and
    ``F_F`` is infinite (p = 0).
    """
    denominator = n_blocks * (k - 1) - chi2_f
    statistic = math.inf if denominator <= 0 else (n_blocks - 1) * chi2_f / denominator
    df1, df2 = k - 1, (k - 1) * (n_blocks - 1)
    return {"statistic": statistic, "pvalue": float(stats.f.sf(statistic, df1, df2)), "df1": df1, "df2": df2}


def nemenyi_critical_difference(k: int, n_blocks: int, alpha: float = 0.05) -> float:
    """``CD = q_alpha sqrt(k (k + 1) / (6 N))``, ``q_alpha`` = studentized range quantile / sqrt(2).

    Demsar 2006, Sec. 3.2.2 and Table 5(a): for k = 4, alpha = 0.05, q_alpha = 2.569.
    """
    q_alpha = stats.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0)
    return float(q_alpha * math.sqrt(k * (k + 1) / (6.0 * n_blocks)))


def nemenyi_pvalues(blocks: BlockMatrix) -> pd.DataFrame:
    """Pairwise Nemenyi p-values (scikit-posthocs); ``p < alpha`` exactly when ``|R_i - R_j| > CD``."""
    return (
        scikit_posthocs.posthoc_nemenyi_friedman(blocks.oriented().to_numpy())
        .set_axis(blocks.methods, axis=0)
        .set_axis(blocks.methods, axis=1)
    )


def _signed_differences(blocks: BlockMatrix, method: str, reference: str) -> np.ndarray:
    """``method`` minus ``reference`` per block, signed so that positive means ``method`` is better.

    Rounded to 12 decimals so that differences equal in exact arithmetic tie in their ranks.
    """
    oriented = blocks.oriented()
    return np.round((oriented[method] - oriented[reference]).to_numpy(dtype=float), 12)


def rank_biserial(differences: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation ``(R+ - R-) / (R+ + R-)`` (Kerby 2014).

    ``R+`` and ``R-`` sum the ranks of ``|d|`` over positive and negative differences, zero
    differences splitting their ranks evenly (so they only enlarge the denominator); NaN when
    there are no differences.
    """
    if differences.size == 0:
        return math.nan
    abs_ranks = stats.rankdata(np.abs(differences))
    r_plus, r_minus = abs_ranks[differences > 0].sum(), abs_ranks[differences < 0].sum()
    return float((r_plus - r_minus) / abs_ranks.sum())


def holm_adjusted(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, by statsmodels' ``multipletests``.

    ``multipletests`` runs ``gc.collect()`` on every Holm call, which takes about half a
    second in a process holding torch and MLflow; the objects alive before the call are
    frozen out of that collection (``gc.freeze``) while it runs.
    """
    gc.freeze()
    try:
        return multipletests(list(pvalues), method="holm")[1]
    finally:
        gc.unfreeze()


def wilcoxon_holm(blocks: BlockMatrix, reference: str) -> dict[str, dict[str, float]]:
    """Wilcoxon signed-rank test of every other method against ``reference``, Holm-corrected.

    Per method: ``statistic`` ``min(R+, R-)`` and its two-sided ``pvalue`` (SciPy,
    ``zero_method="zsplit"``), ``pvalue_holm`` (statsmodels' Holm step-down over the ``k - 1``
    tests), the effect sizes ``mean_difference`` (method minus reference, in the metric's
    units) and ``rank_biserial`` (positive: the method is better), and the blocks it
    ``wins``, ``ties`` and ``losses``.
    """
    if reference not in blocks.values.columns:
        raise ValueError(f"reference method {reference!r} is not among {blocks.methods}")
    others = [m for m in blocks.methods if m != reference]
    results: dict[str, dict[str, float]] = {}
    for method in others:
        better = _signed_differences(blocks, method, reference)
        test = stats.wilcoxon(better, zero_method="zsplit")
        results[method] = {
            "statistic": float(test.statistic),
            "pvalue": float(test.pvalue),
            "mean_difference": float((blocks.values[method] - blocks.values[reference]).mean()),
            "rank_biserial": rank_biserial(better),
            "wins": int(np.sum(better > 0)),
            "ties": int(np.sum(better == 0)),
            "losses": int(np.sum(better < 0)),
            "n_blocks": int(better.size),
        }
    if others:
        for method, adjusted in zip(others, holm_adjusted([results[m]["pvalue"] for m in others])):
            results[method]["pvalue_holm"] = float(adjusted)
    return results


def wilcoxon_key(reference: str, main_reference: str) -> str:
    """Where :func:`compare` puts the tests against ``reference``: ``wilcoxon_holm`` for the main one."""
    return "wilcoxon_holm" if reference == main_reference else f"wilcoxon_holm_vs_{reference}"


def compare(blocks: BlockMatrix, references: Sequence[str], alpha: float = 0.05) -> dict[str, Any]:
    """Every test of this module on one block matrix, as plain values for ``stats.json``.

    Friedman, Iman-Davenport and Nemenyi need at least three methods and two blocks; the
    Wilcoxon tests need two methods, two blocks, and the reference among the methods. What
    cannot be computed is left out and ``notes`` says why; ``notes`` also says when every
    block ties, so that no test can tell the methods apart.
    """
    k, n = len(blocks.methods), blocks.n_blocks
    result: dict[str, Any] = {
        "metric": blocks.metric,
        "direction": blocks.direction,
        "blocks": blocks.design,
        "n_blocks": n,
        "methods": blocks.methods,
        "dropped_blocks": list(blocks.dropped),
        "average_ranks": {m: float(r) for m, r in average_ranks(blocks).items()} if n else {},
        "notes": [],
    }
    if k < 2:
        result["notes"].append(
            f"only one method ({', '.join(blocks.methods) or 'none'}) has scores on {blocks.metric}: "
            "there is nothing to compare it with, so no test is run"
        )
        return result
    if n < 2:
        result["notes"].append(
            f"{n} complete block(s) for {blocks.metric}: a test over blocks needs at least 2 "
            "(run more seeds, or compare per task)"
        )
        return result
    if tied_blocks(blocks) == n:
        result["notes"].append(
            f"all {n} blocks tie: every method ({', '.join(blocks.methods)}) has the same {blocks.metric} in every "
            "block, so no test can tell the methods apart (Friedman's chi2_F is 0 and every Wilcoxon p is 1; "
            "the tie-corrected Friedman statistic is undefined)"
        )
    if k >= 3:
        result["friedman"] = friedman(blocks)
        result["iman_davenport"] = iman_davenport(result["friedman"]["statistic"], n, k)
        result["nemenyi_cd"] = nemenyi_critical_difference(k, n, alpha)
        pvalues = nemenyi_pvalues(blocks)
        result["nemenyi_pvalues"] = {a: {b: float(pvalues.loc[a, b]) for b in pvalues.columns} for a in pvalues.index}
    else:
        result["notes"].append(
            "with two methods the Friedman test and the Nemenyi critical difference add nothing to "
            "the Wilcoxon signed-rank test, which is the test for two methods (Demsar 2006, Sec. 3.1.3)"
        )
    for reference in dict.fromkeys(references):
        if reference in blocks.values.columns:
            result[wilcoxon_key(reference, references[0])] = wilcoxon_holm(blocks, reference)
        else:
            result["notes"].append(
                f"{reference!r} has no scores on {blocks.metric} (methods: {', '.join(blocks.methods)}), so "
                "nothing is tested against it; --reference chooses the reference method"
            )
    return result


def auroc_by_ranks(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each task, ``(sum of positive ranks - n1 (n1 + 1) / 2) / (n1 n0)``.

    The Mann-Whitney form of the area under the ROC curve (Hanley & McNeil 1982); ties get
    average ranks, which counts a tied positive-negative pair as one half, like
    ``sklearn.metrics.roc_auc_score``. ``labels`` (0/1) and ``scores`` have shape
    ``[..., n_items, n_tasks]``; the result ``[..., n_tasks]`` is NaN for a task with one class.
    """
    positives = labels.astype(bool)
    n1 = positives.sum(axis=-2)
    n0 = positives.shape[-2] - n1
    item_ranks = stats.rankdata(scores, axis=-2)
    positive_rank_sums = np.where(positives, item_ranks, 0.0).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (positive_rank_sums - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auroc, np.nan)


@dataclass(frozen=True)
class PairedPredictions:
    """Test predictions of two methods for one seed, on the same items in the same order.

    Attributes:
        labels: 0/1 ``[n_items, n_tasks]``.
        first, second: predicted probabilities ``[n_items, n_tasks]`` of the two methods.
    """

    labels: np.ndarray
    first: np.ndarray
    second: np.ndarray


def mean_auroc_difference(pairs: Sequence[PairedPredictions], items: np.ndarray) -> np.ndarray:
    """Mean over seeds of (mean AUROC of ``first`` - mean AUROC of ``second``) on ``items``.

    ``items`` indexes the test items, shape ``[..., n]`` (one row per resample); mean AUROC is
    over the tasks whose labels on those items hold both classes (the same tasks for both
    methods). Returns shape ``[...]``.
    """
    differences = []
    for pair in pairs:
        labels = pair.labels[items]
        per_task = auroc_by_ranks(labels, pair.first[items]) - auroc_by_ranks(labels, pair.second[items])
        differences.append(np.nanmean(per_task, axis=-1))
    return np.mean(differences, axis=0)


def paired_bootstrap_mean_auroc(
    pairs: Sequence[PairedPredictions], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Point estimate and percentile bootstrap interval of the mean-AUROC difference.

    Test items are resampled with replacement (SciPy's ``bootstrap``, percentile method); each
    resample is applied to both methods and to every seed, so the interval accounts for the
    pairing of predictions on the same items.
    """
    if not pairs:
        raise ValueError("the paired bootstrap needs the test predictions of at least one seed")
    n_items = pairs[0].labels.shape[0]
    if any(p.labels.shape != pairs[0].labels.shape for p in pairs):
        raise ValueError("every seed must predict the same test items")
    everything = np.arange(n_items)
    resamples_per_batch = max(1, _BOOTSTRAP_BATCH_CELLS // (n_items * pairs[0].labels.shape[1] * len(pairs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may leave a task with one class
        interval = stats.bootstrap(
            (everything,),
            lambda items, axis: mean_auroc_difference(pairs, items),
            n_resamples=n_resamples,
            batch=resamples_per_batch,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            rng=np.random.default_rng(seed),
        ).confidence_interval
    return {
        "difference": float(mean_auroc_difference(pairs, everything)),
        "ci_low": float(interval.low),
        "ci_high": float(interval.high),
        "confidence": confidence,
        "n_items": n_items,
        "n_seeds": len(pairs),
        "n_resamples": n_resamples,
    }
