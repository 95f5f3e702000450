"""Training on DeepSpeed: the engine (plain or pipeline), the loss, the loop, schedules and metrics."""
