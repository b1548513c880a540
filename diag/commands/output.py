"""The one strict JSON printer of the command line: :func:`emit_json` refuses NaN/Inf (naming where it is)
unless a table asks for ``null``; :func:`check_finite_result` is the same check for human output."""

from __future__ import annotations

import json
import math
import sys

from train.errors import TvdiagError


def _first_non_finite(obj, where: str = "") -> str | None:
    """JSON path of the first NaN/Inf float in a nested dict/list (None when all are finite)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "<value>")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def check_finite_result(obj, what: str = "result") -> None:
    """Raise :class:`TvdiagError` naming the first non-finite number in ``obj``."""
    bad = _first_non_finite(obj)
    if bad is not None:
        raise TvdiagError(f"The {what} is not finite at '{bad}' (NaN or Inf): the settings are outside the "
                          "range where the computation is meaningful")


def _json_default(value):
    """numpy / torch scalars as floats (ints stay ints), paths and other objects as strings."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):  # a multi-element array or tensor
            return value.tolist()
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def dumps_strict(obj, **kwargs) -> str:
    """``json.dumps`` that refuses NaN/Inf (a :class:`TvdiagError` naming where it is)."""
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("default", _json_default)
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        check_finite_result(json.loads(json.dumps(obj, default=kwargs["default"])))
        raise


def _nan_to_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    return obj


def emit_json(obj, *, nan_as_null: bool = False, **kwargs) -> None:
    """Print ``obj`` as strict JSON on stdout (nothing is printed when it is not finite).

    Args:
        nan_as_null: for tables where NaN means "not available" (a statistic undefined on
            too few pairs, a column of a lower tier): write ``null`` instead of failing.
    """
    if nan_as_null:
        obj = _nan_to_null(json.loads(json.dumps(obj, default=kwargs.get("default", _json_default))))
    text = dumps_strict(obj, **kwargs)
    sys.stdout.write(text + "\n")
