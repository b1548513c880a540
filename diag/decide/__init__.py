"""Decisions from measured and predicted numbers: the λ2 and verdict rules, the predictors
learnt on known pairs, source ranking and per-source recommendations."""
