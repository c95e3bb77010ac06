"""Public functional ops; one module per op family (random, forward, step, langevin, schedule)."""
