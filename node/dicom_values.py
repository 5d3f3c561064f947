"""Reading untrusted DICOM values: typed accessors, size limits and one error type.

Everything a received data set holds is untrusted. These helpers turn a value into
what the readers need (an integer, finite floats, a declared volume size that is
neither degenerate nor huge) or raise ``ValueError`` naming the attribute, and
:func:`problems_in` turns whatever decoding raises into
:class:`~node.errors.InvalidSeriesError` naming the instance or series.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from node.errors import InvalidSeriesError, UnsupportedSeriesError

MAX_VOXELS = 512**3
"""Largest volume the readers convert (columns x rows x slices): 0.5 GiB as float32."""
MIN_VOXELS_PER_AXIS = 8
"""Smallest extent along each axis of a volume worth segmenting (a 1x1x1 "volume" is refused)."""
BITS_ALLOCATED = (8, 16, 32)
"""Supported BitsAllocated values (native grey-scale pixels)."""

# What decoding an arbitrary dataset can raise (pydicom value conversion, numpy, pixel handlers).
DECODING_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    OverflowError,
    ZeroDivisionError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    InvalidDicomError,
)


@contextmanager
def problems_in(subject: str) -> Iterator[None]:
    """Raise any decoding error of the block as :class:`InvalidSeriesError` naming ``subject``.

    Parameters
    ----------
    subject
        What is being read, e.g. ``"NM instance 1.2.3"``; prefixes the message.

    Raises
    ------
    InvalidSeriesError
        For any ``ValueError``, ``TypeError``, ``AttributeError``, ``KeyError``,
        ``IndexError``, ``OverflowError``, ``NotImplementedError``, ``RuntimeError``,
        ``struct.error`` or pydicom ``InvalidDicomError`` raised in the block. An
        :class:`InvalidSeriesError` or :class:`UnsupportedSeriesError` from an inner
        block passes unchanged.
    """
    try:
        yield
    except (InvalidSeriesError, UnsupportedSeriesError):
        raise
    except DECODING_ERRORS as exc:
        raise InvalidSeriesError(f"{subject}: {exc}") from exc


def instance_label(ds: Dataset) -> str:
    """``"<SOP Instance UID>"`` of ``ds`` for messages, ``"?"`` when it cannot be read."""
    try:
        return str(ds.get("SOPInstanceUID") or "?")
    except DECODING_ERRORS:
        return "?"


def series_label(ds: Dataset) -> str:
    """``"<Series Instance UID>"`` of ``ds`` for messages, ``"?"`` when it cannot be read."""
    try:
        return str(ds.get("SeriesInstanceUID") or "?")
    except DECODING_ERRORS:
        return "?"


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer_attribute(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """The integer value of ``keyword`` (``default`` when absent or empty).

    Raises
    ------
    ValueError
        Absent without a default, or not a single integer.
    """
    value = ds.get(keyword)
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        if default is None:
            raise ValueError(f"{keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} {shown(value)} is not a single integer") from None


def finite_floats(value: object, name: str, count: int | None = None) -> tuple[float, ...]:
    """A DICOM numeric value (VM >= 1) as finite floats, optionally exactly ``count`` of them.

    Raises
    ------
    ValueError
        Non-numeric, non-finite, or the wrong number of values; the message names ``name``.
    """
    try:
        values = tuple(float(v) for v in as_list(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} {shown(value)} is not numeric") from None
    if count is not None and len(values) != count:
        raise ValueError(f"{name} must hold {count} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} {shown(list(values))} is not finite")
    return values


def check_declared_shape(columns: int, rows: int, slices: int) -> None:
    """Refuse a declared volume that is too small to segment or too large to convert.

    Called before any pixel is decoded, so a header announcing 1024x1024x1024 voxels
    allocates nothing.

    Raises
    ------
    ValueError
        Any extent below :data:`MIN_VOXELS_PER_AXIS` or more than :data:`MAX_VOXELS` voxels.
    """
    shape = f"{columns}x{rows}x{slices}"
    if min(columns, rows, slices) < MIN_VOXELS_PER_AXIS:
        raise ValueError(
            f"declared volume {shape} (columns x rows x slices) is too small to segment: "
            f"at least {MIN_VOXELS_PER_AXIS} voxels along each axis are needed"
        )
    if columns * rows * slices > MAX_VOXELS:
        raise ValueError(
            f"declared volume {shape} ({columns * rows * slices} voxels) is larger than the "
            f"{MAX_VOXELS} voxels the node converts"
        )


def as_list(value: object) -> list:
    """A DICOM value with VM >= 1 as a list (pydicom returns a scalar for VM 1)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, float)):
        return [value]
    return list(value)  # type: ignore[call-overload]
