"""The one error type of the data pipeline, and the CLI wrapper that turns it into a one-line message."""
import sys


class DataError(Exception):
    """Bad input, bad files or bad settings: the message says what, where (file, line, row) and what to do."""


def run_cli(main) -> int:
    """Run `main()`; report DataError, OS errors and Ctrl-C as one line on stderr with a non-zero exit code."""
    try:
        main()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    return 0
