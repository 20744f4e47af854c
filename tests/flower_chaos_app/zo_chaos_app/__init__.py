"""A tiny zo-optim Flower app driven by tests/flower_processes.py (the real-process chaos test)."""
