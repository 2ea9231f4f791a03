"""The bidirectional transformer, its losses, and the start-up mask self-test."""
