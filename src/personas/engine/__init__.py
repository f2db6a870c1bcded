"""The decode engine: slots refilled from a queue, cache pages, prefixes stored once, the decode
step as CUDA graphs (engine.py is the public face; docs/engine.md how it works), the older
chunked loops for architectures its decoder does not run (chunked/), and which of them samples
a grid (loop.py)."""
