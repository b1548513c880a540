"""Benchmarks: curvature products and estimators against PyHessian / curvlinops, source
ranking speed, and the real-size device check."""
