"""Triton kernels of the decode step: each row's own cache read through its pages (paged), each
row's prefix span in the pool (prefix), and the layers' small steps fused (layer)."""
