"""Exceptions raised by the node's DICOM conversion layer."""

from __future__ import annotations


class UnsupportedSeriesError(Exception):
    """A series the node recognises but deliberately does not process.

    Raised for inputs that are valid DICOM but outside what the node handles
    (gated SPECT, projection data, several reconstructions in one series...).
    The message names the reason; callers record it and skip the series.
    Malformed input raises :class:`ValueError` instead.
    """
