"""Compatibility with the public HICom release: its configs and checkpoints in our modules."""
