"""Exceptions raised by the node's DICOM conversion layer.

Two kinds, so that a caller can tell "not for us" from "broken":

* :class:`UnsupportedSeriesError`: valid input the node deliberately does not process
  (the job is ``skipped`` with the reason);
* :class:`InvalidSeriesError`: malformed or inconsistent input that cannot be converted
  (the job is ``failed`` with the reason; the instances stay stored).

The readers in :mod:`node.nm_reader` and :mod:`node.convert` raise nothing else.
"""

from __future__ import annotations


class UnsupportedSeriesError(Exception):
    """A series the node recognises but deliberately does not process.

    Raised for inputs that are valid DICOM but outside what the node handles
    (gated SPECT, projection data, several reconstructions in one series...).
    The message names the reason; callers record it and skip the series.
    Malformed input raises :class:`InvalidSeriesError` instead.
    """


class InvalidSeriesError(ValueError):
    """A series that cannot be converted: missing, malformed or inconsistent attributes or pixels.

    The message names the problem and the instance (``NM instance <SOP Instance UID>: ...``)
    or series (``series <Series Instance UID>: ...``) it was found in. A subclass of
    :class:`ValueError`, so callers that catch ``ValueError`` keep working.
    """
