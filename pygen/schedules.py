"""Noise schedules (work in progress)."""
