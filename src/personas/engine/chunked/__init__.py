"""The older decode loops, for architectures the engine's decoder does not run and as the
benchmarks' baseline: transformers' generate in chunks (eager), and a CUDA-graph chunk loop
over a static cache (graphed)."""
