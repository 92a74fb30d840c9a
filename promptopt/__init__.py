"""promptopt's entry points: the `promptopt` command (`promptopt.cli`). The service lives in `app`, the queue
worker in `workers`; this package composes them (embedded mode runs both in one process)."""
