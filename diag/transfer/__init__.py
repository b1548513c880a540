"""Eq. 8 and its evaluation: the transferred state, Table-1 rows and controls, the metrics
(E-RMSE, Kendall, IoU@K), the curvature-aware transfer methods and their choice on ``val``."""
