"""The one exception type a user can cause while pointing visionkit at data."""
from __future__ import annotations


class DataError(ValueError):
    """A user-fixable data problem; the message is one line saying what is wrong and what to do."""
