"""Errors raised by the data pipeline."""


class DataError(ValueError):
    """Bad input data: names the file, the column and the offending value."""
