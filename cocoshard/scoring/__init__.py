"""scoring: the leaderboard's metric, the submission JSON, and the commands that make and judge it.

Owns: metrics and threshold tuning (`metrics`, pure), the submission format (`submission`), the
scores file (`scores`), the labels a submission is scored against (`ground_truth`), the
commands `predict` and `evaluate`, and the report's figures (`report`).

May import: everything earlier in the flow (`prepare`, `loading`, `training`) and the foundation
modules.
"""
