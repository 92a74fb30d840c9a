"""The evaluation cache: deterministic LLM answers kept in process (LRU) and durably (Postgres or SQLite).

`MeteredLLM` reads through it; `DurableCacheStore` writes answers behind the job as they arrive and charges
their usage through a callback, so this package knows nothing about jobs.
"""
