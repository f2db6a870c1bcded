"""From rows to samples: the grid and its seeds (grid, no torch), the token chooser, shared
prefill, the eager and the CUDA-graph decode loops, and the scheduler that feeds them."""
