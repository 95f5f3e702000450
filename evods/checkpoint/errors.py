class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message says which one, what is wrong and what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its step marker, cannot be read, or hold objects evods does not unpickle;
    auto-resume then falls back to the previous complete checkpoint."""


class FailedOnAnotherRank(CheckpointError):
    """This rank stops because another rank failed; that rank prints the error, so commands print nothing for this
    one (evods.cli.run_cli) and a job shows one line, not one per rank. `reason` is the other rank's message."""

    reported_by_another_rank = True

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what} failed on another rank: {reason}")
        self.reason = reason
