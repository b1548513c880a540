"""Correlation statistics for pair tables: Pearson, Spearman, pair bootstrap, permutation.

A study table has one row per ordered (source, target) pair.  Pairs that share a source or
a target are not independent, so the naive p-value of Pearson's r (the one the preprint
reports in Appendix C) is optimistic.  This module gives, beside it:

* :func:`pair_bootstrap_ci` — a two-way cluster bootstrap that resamples *domains as
  sources* and *domains as targets*;
* :func:`permutation_pvalue` — a QAP (quadratic assignment procedure) permutation test that
  relabels the domains of the y-matrix and so keeps its row/column dependence.

:func:`correlate` bundles everything into one :class:`CorrelationReport`.
"""

from diag.stats.bootstrap import BootstrapCI, pair_bootstrap_ci
from diag.stats.correlation import APPENDIX_C, CorrelationResult, complete_pairs, pearson, spearman
from diag.stats.conformal import jackknife_plus
from diag.stats.permutation import PermutationResult, permutation_pvalue
from diag.stats.proportion import wilson_interval
from diag.stats.report import appendix_c_over_seeds, CorrelationReport, correlate, correlate_appendix_c, with_normalised

__all__ = [
    "APPENDIX_C",
    "BootstrapCI",
    "CorrelationReport",
    "CorrelationResult",
    "PermutationResult",
    "complete_pairs",
    "correlate",
    "appendix_c_over_seeds",
    "correlate_appendix_c",
    "jackknife_plus",
    "pair_bootstrap_ci",
    "pearson",
    "permutation_pvalue",
    "spearman",
    "wilson_interval",
    "with_normalised",
]
