class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message says which one, what is wrong and what to do."""
