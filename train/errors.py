"""Exceptions shared by ``train`` and ``diag``.

Every user-facing failure raises a subclass of :class:`TvdiagError`; the CLI turns
them into one line on stderr and exit code 2.
"""


class TvdiagError(ValueError):
    """Base class of every error caused by bad input, bad files or a bad setup."""


class UnknownNameError(TvdiagError, KeyError):
    """An unknown domain, backbone, method or other name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ArtifactError(TvdiagError):
    """A missing, corrupt, truncated or unsafe artifact file (pickle, bad safetensors, NaN/Inf)."""


class BaseMismatchError(TvdiagError):
    """Task vectors or models built on different base weights or with different shapes."""


class DataError(TvdiagError):
    """Empty data, labels out of range, missing dataset files."""


class StoreError(TvdiagError):
    """The artifact store cannot be written or read."""


class UncheckedArtifactWarning(UserWarning):
    """A tvdiag artifact written before checksums existed: its tensor bytes cannot be verified."""


def unknown(kind: str, name: str, available) -> UnknownNameError:
    """Build the standard ``Unknown <kind> 'x'. Available: a, b, c`` error."""
    choices = ", ".join(sorted(available))
    return UnknownNameError(f"Unknown {kind} '{name}'. Available: {choices}")
