"""Demo rows: one module per method, each with ``run(ctx) -> list[DemoRow]``."""
