"""flexc's simulator: the real scheduler and policies over a simulated executor and clock (see simulate.py)."""
