"""evods' commands (train_ds.py and tools/*.py in a clone, `evods-*` once installed), and how each one ends on a
user's mistake: one line on stderr that says what to fix, and an exit code.

The commands name the errors that mean "the input was wrong"; anything else is a bug in evods and keeps its
traceback.
"""
import os
import sys
from collections.abc import Callable


def run_cli(main: Callable[[], int | None], user_errors: tuple[type[BaseException], ...], prog: str | None = None,
            exit_code: int = 1) -> int:
    prog = prog or os.path.basename(sys.argv[0])  # "tokenizer.py" from a clone, "evods-tokenizer" once installed
    try:
        return main() or 0
    except user_errors as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
