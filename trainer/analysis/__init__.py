"""Offline analysis of finished runs: the common held-out set and the A/B report."""
