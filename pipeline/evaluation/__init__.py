"""Judging what was trained: the ``evaluate`` stage's figures and the HTML report."""
