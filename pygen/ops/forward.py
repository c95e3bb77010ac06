"""Op family 'forward' (work in progress)."""
