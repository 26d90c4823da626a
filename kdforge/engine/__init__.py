"""Training engine: the one trainer, distributed helpers, checkpoints, schedules, EMA, logging."""
