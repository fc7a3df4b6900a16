"""Data errors: one exception type so callers can tell bad input files from programming bugs."""
from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file, the key and
    what was expected, so a user can fix the data without reading the code."""
