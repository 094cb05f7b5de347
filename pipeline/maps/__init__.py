"""Interaction maps: which input atoms and output fields each parameter element touches."""
