"""A tiny zo-optim Flower app driven by zo_optim/bench/flower_processes.py (the real-process chaos test)."""
