"""Judges: who says whether an image shows a concept (scorers.py), and the probe set they score (probe.py)."""
