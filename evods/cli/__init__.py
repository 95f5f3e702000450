"""evods' commands (train_ds.py and tools/*.py in a clone, `evods-*` once installed), and how each one ends on a
user's mistake: one line on stderr that says what to fix, and an exit code.

The commands name the errors that mean "the input was wrong"; a file-system error (permission, full disk, read-only
mount) is always one of them. Anything else is a bug in evods and keeps its traceback. In a multi-rank job an error
that every rank learns of is printed by the rank that hit it first; the others exit with the same code in silence
(errors marked `reported_by_another_rank`), so a job prints it once.
"""
import os
import sys
from collections.abc import Callable

from evods.console import quiet_libraries


def run_cli(main: Callable[[], int | None], user_errors: tuple[type[BaseException], ...], prog: str | None = None,
            exit_code: int = 1) -> int:
    prog = prog or os.path.basename(sys.argv[0])  # "tokenizer.py" from a clone, "evods-tokenizer" once installed
    quiet_libraries()  # before main imports them (evods.console; EVODS_VERBOSE=1 shows everything)
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except Exception as error:
        from evods.storage.base import explain_os_error, is_file_system_error  # here: the commands start faster

        if getattr(error, "reported_by_another_rank", False):
            return exit_code
        if isinstance(error, OSError) and is_file_system_error(error):
            error = explain_os_error(error, "use", error.filename or "a file")
        elif not isinstance(error, user_errors):
            raise
        print(f"{prog}: {error}", file=sys.stderr)
        return exit_code
