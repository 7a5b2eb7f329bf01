"""Statistics of ``bench report`` against Demsar (2006) and independent references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from bench.stats import (
    BlockMatrix,
    PairedPredictions,
    auroc_by_ranks,
    average_ranks,
    block_matrix,
    compare,
    friedman,
    iman_davenport,
    nemenyi_critical_difference,
    paired_bootstrap_mean_auroc,
    rank_biserial,
    wilcoxon_holm,
)

DEMSAR_CSV = Path(__file__).parent / "reference" / "demsar2006_table6.csv"
"""Demsar, "Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7 (2006) 1-30,
Table 6: AUC of C4.5 (m = 0, cf = 0.25), C4.5+m, C4.5+cf and C4.5+m+cf on 14 UCI data sets, in
the long format of ``bench report --from``.

The paper prints the values rounded to 3 decimals; its ranks come from the unrounded values.
In the "voting" row C4.5+cf (rank 2) and C4.5+m+cf (rank 3) both print as 0.975: the unrounded
C4.5+cf is slightly higher, so the file holds 0.9751 for it to break the tie the same way.
With the printed values that row ties and the ranks become 2.929 and 1.929 (tested below).
"""
DEMSAR_METHODS = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]


def demsar_table() -> pd.DataFrame:
    """Table 6 as data sets x methods."""
    long = pd.read_csv(DEMSAR_CSV)
    return long.pivot(index="dataset", columns="method", values="value")[DEMSAR_METHODS]


def demsar_blocks(table: pd.DataFrame | None = None) -> BlockMatrix:
    return BlockMatrix("auc", demsar_table() if table is None else table, "maximize", "data sets")


def test_demsar_table_6_ranks_friedman_iman_davenport_and_critical_difference() -> None:
    blocks = demsar_blocks()
    ranks = average_ranks(blocks)
    assert [round(ranks[m], 3) for m in DEMSAR_METHODS] == [3.143, 2.000, 2.893, 1.964]
    chi2 = friedman(blocks)
    assert round(chi2["statistic"], 2) == 9.28 and chi2["df"] == 3
    f_f = iman_davenport(chi2["statistic"], 14, 4)
    assert round(f_f["statistic"], 2) == 3.69 and (f_f["df1"], f_f["df2"]) == (3, 39)
    # Demsar: "The critical value of F(3, 39) for alpha = 0.05 is 2.85, so we reject the null-hypothesis."
    assert f_f["pvalue"] < 0.05 < scipy_stats.f.sf(2.85, 3, 39) + 0.001
    assert round(nemenyi_critical_difference(4, 14, 0.05), 2) == 1.25
    assert round(nemenyi_critical_difference(4, 14, 0.10), 2) == 1.12


def test_rounded_table_6_ties_the_voting_row() -> None:
    printed = demsar_table()
    printed.loc["voting", "C4.5+cf"] = 0.975
    ranks = average_ranks(demsar_blocks(printed))
    assert round(ranks["C4.5+cf"], 3) == 2.929 and round(ranks["C4.5+m+cf"], 3) == 1.929


@pytest.mark.parametrize(
    "k, q_005, q_010",
    [(2, 1.960, 1.645), (3, 2.343, 2.052), (4, 2.569, 2.291), (6, 2.850, 2.589), (10, 3.164, 2.920)],
)
def test_nemenyi_critical_values_of_demsar_table_5a(k: int, q_005: float, q_010: float) -> None:
    """The table prints 3 decimals (k = 3: 2.343 for 2.3437), hence the tolerance."""
    n = 7
    scale = math.sqrt(k * (k + 1) / (6 * n))
    assert nemenyi_critical_difference(k, n, 0.05) / scale == pytest.approx(q_005, abs=1e-3)
    assert nemenyi_critical_difference(k, n, 0.10) / scale == pytest.approx(q_010, abs=1e-3)


def test_nemenyi_groups_of_demsar_figure_1a() -> None:
    """At alpha = 0.10 pure C4.5 is worse than C4.5+m and C4.5+m+cf; nothing else differs."""
    result = compare(demsar_blocks(), ["C4.5"], alpha=0.10)
    significant = {
        frozenset((a, b)) for a, row in result["nemenyi_pvalues"].items() for b, p in row.items() if p < 0.10
    }
    assert significant == {frozenset(("C4.5", "C4.5+m")), frozenset(("C4.5", "C4.5+m+cf"))}
    ranks = result["average_ranks"]
    for a, row in result["nemenyi_pvalues"].items():
        for b, p in row.items():  # the p-values and the CD draw the same line
            assert (p < 0.10) == (abs(ranks[a] - ranks[b]) > result["nemenyi_cd"])


def test_wilcoxon_against_demsar_section_3_1_3() -> None:
    """C4.5+m vs C4.5 (Demsar's Table 2): R+ = 93, R- = 12 with zero differences split."""
    tests = wilcoxon_holm(demsar_blocks(), "C4.5")
    m = tests["C4.5+m"]
    assert m["statistic"] == 12.0
    assert m["rank_biserial"] == pytest.approx((93 - 12) / 105)
    assert (m["wins"], m["ties"], m["losses"]) == (10, 2, 2)
    assert m["pvalue"] < 0.05  # Demsar: "We therefore reject the null-hypothesis."
    raw = sorted((tests[k]["pvalue"], k) for k in tests)
    holm = [min(1.0, max((3 - j) * raw[j][0] for j in range(i + 1))) for i in range(3)]
    assert [tests[k]["pvalue_holm"] for _, k in raw] == pytest.approx(holm)


def test_rank_biserial_extremes_and_zero_split() -> None:
    assert rank_biserial(np.array([0.1, 0.2, 0.3])) == 1.0
    assert rank_biserial(np.array([-0.1, -0.2])) == -1.0
    # ranks of |d|: 0 -> 1, 0.1 -> 2, 0.2 -> 3; (2 - 3) / (1 + 2 + 3)
    assert rank_biserial(np.array([0.0, 0.1, -0.2])) == pytest.approx(-1 / 6)


def test_friedman_tie_corrected_statistic_is_scipys() -> None:
    blocks = demsar_blocks()
    expected = scipy_stats.friedmanchisquare(*(blocks.values[m] for m in DEMSAR_METHODS))
    assert friedman(blocks)["tie_corrected_statistic"] == pytest.approx(expected.statistic)


def test_lower_is_better_metrics_rank_the_smallest_first() -> None:
    errors = pd.DataFrame({"a": [0.1, 0.2, 0.3], "b": [0.4, 0.5, 0.6], "c": [0.7, 0.8, 0.9]})
    ranks = average_ranks(BlockMatrix("abs_err", errors, "minimize", "seeds"))
    assert ranks.to_dict() == {"a": 1.0, "b": 2.0, "c": 3.0}
    tests = wilcoxon_holm(BlockMatrix("abs_err", errors, "minimize", "seeds"), "b")
    assert tests["a"]["rank_biserial"] == 1.0 and tests["c"]["rank_biserial"] == -1.0


def test_compare_says_why_tests_are_missing() -> None:
    one = compare(BlockMatrix("auc", pd.DataFrame({"ew": [0.5, 0.6]}), "maximize", "seeds"), ["ew"])
    assert "friedman" not in one and "wilcoxon_holm" not in one
    assert "only one method" in one["notes"][0]
    two = compare(BlockMatrix("auc", pd.DataFrame({"ew": [0.5, 0.6], "uw": [0.4, 0.7]}), "maximize", "seeds"), ["uw"])
    assert "friedman" not in two and "ew" in two["wilcoxon_holm"]
    assert any("two methods" in note for note in two["notes"])
    tied = compare(BlockMatrix("acc", pd.DataFrame({m: [0.9, 0.8] for m in "abc"}), "maximize", "seeds"), ["a"])
    assert tied["friedman"]["statistic"] == 0.0 and tied["friedman"]["pvalue"] == 1.0
    assert tied["wilcoxon_holm"]["b"]["pvalue"] == 1.0


def test_all_tied_blocks_leave_the_tie_corrected_friedman_undefined_and_say_why() -> None:
    """28 blocks (14 tasks x 2 seeds) in which three methods score the same: SciPy's tie correction is 0/0."""
    scores = np.linspace(0.4, 0.9, 28)
    tied = BlockMatrix("auroc", pd.DataFrame({m: scores for m in ("ew", "deepchest", "uw")}), "maximize", "tasks")
    chi2 = friedman(tied)
    assert chi2["statistic"] == 0.0 and chi2["pvalue"] == 1.0
    assert math.isnan(chi2["tie_corrected_statistic"]) and math.isnan(chi2["tie_corrected_pvalue"])
    assert "every one of the 28 blocks ties all 3 methods" in chi2["tie_corrected_undefined"]
    result = compare(tied, ["ew"])
    assert any(note.startswith("all 28 blocks tie") for note in result["notes"])
    assert {t["pvalue"] for t in result["wilcoxon_holm"].values()} == {1.0}
    one_block_differs = tied.values.copy()
    one_block_differs.loc[0, "uw"] = 0.1
    untied = friedman(BlockMatrix("auroc", one_block_differs, "maximize", "tasks"))
    assert "tie_corrected_undefined" not in untied and untied["tie_corrected_statistic"] > 0


def long_rows(values: dict[tuple[str, str, str, str], float]) -> pd.DataFrame:
    return pd.DataFrame(
        [(m, d, s, k, v) for (m, d, s, k), v in values.items()],
        columns=["method", "dataset", "seed", "metric", "value"],
    )


def test_block_matrix_drops_incomplete_blocks_and_names_them() -> None:
    values = {}
    for seed in "012":
        for task in ("A", "B"):
            for method in ("ew", "uw"):
                if not (method == "uw" and seed == "2"):
                    values[(method, "suite", seed, f"auroc/{task}")] = 0.5 + 0.1 * int(seed)
    blocks = block_matrix(long_rows(values), "auroc", "maximize")
    assert blocks.design == "tasks x seeds of suite" and blocks.n_blocks == 4
    assert blocks.dropped == ("task A, seed 2 (no uw)", "task B, seed 2 (no uw)")


def test_block_matrix_over_data_sets_averages_seeds() -> None:
    values = {
        ("a", "d1", "0", "acc"): 0.5,
        ("a", "d1", "1", "acc"): 0.7,
        ("b", "d1", "0", "acc"): 0.4,
        ("a", "d2", "0", "acc"): 0.9,
        ("b", "d2", "0", "acc"): 0.8,
        ("b", "d2", "1", "acc"): 1.0,
    }
    blocks = block_matrix(long_rows(values), "acc", "maximize")
    assert blocks.design.startswith("data sets")
    assert blocks.values.loc["d1"].tolist() == pytest.approx([0.6, 0.4])
    assert blocks.values.loc["d2"].tolist() == pytest.approx([0.9, 0.9])


def test_auroc_by_ranks_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 4)) < 0.3).astype(int)
    scores = np.round(rng.random((50, 4)), 1)  # many tied scores
    expected = [roc_auc_score(labels[:, t], scores[:, t]) for t in range(4)]
    assert auroc_by_ranks(labels, scores) == pytest.approx(expected)
    single_class = np.zeros((5, 1))
    assert np.isnan(auroc_by_ranks(single_class, np.arange(5.0)[:, None])[0])


def test_paired_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random((80, 3)) < 0.4).astype(int)
    noise = rng.random((80, 3))
    good = 0.6 * labels + 0.4 * noise
    same = paired_bootstrap_mean_auroc([PairedPredictions(labels, noise, noise)], n_resamples=200)
    assert same["difference"] == 0.0 and same["ci_low"] == 0.0 and same["ci_high"] == 0.0
    pairs = [PairedPredictions(labels, good, noise), PairedPredictions(labels, good, rng.random((80, 3)))]
    better = paired_bootstrap_mean_auroc(pairs, n_resamples=300)
    expected = np.mean(
        [
            roc_auc_score(labels, p.first, average="macro") - roc_auc_score(labels, p.second, average="macro")
            for p in pairs
        ]
    )
    assert better["difference"] == pytest.approx(expected)
    assert 0 < better["ci_low"] < better["difference"] < better["ci_high"]
    assert (better["n_items"], better["n_seeds"], better["n_resamples"]) == (80, 2, 300)
