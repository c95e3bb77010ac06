"""Op family 'step' (work in progress)."""
