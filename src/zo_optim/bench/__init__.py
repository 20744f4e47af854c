"""Benchmarks behind ``zo-optim bench``: kernels, step, convergence (DESIGN §9)."""
