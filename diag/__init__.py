"""tvdiag diagnostics: curvature, risk, similarity, transfer evaluation, studies and the ``diag`` CLI."""

__version__ = "0.1.0"
