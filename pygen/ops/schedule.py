"""Op family 'schedule' (work in progress)."""
