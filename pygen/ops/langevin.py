"""Op family 'langevin' (work in progress)."""
