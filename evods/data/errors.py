"""The one error type of the data pipeline."""


class DataError(Exception):
    """Bad input, bad files or bad settings: the message says what, where (file, line, row) and what to do."""
