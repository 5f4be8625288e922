"""scoring: the submission JSON and the commands that make and judge it.

Owns: the submission format (`submission`), the scores file (`scores`), threshold files
(`threshold_files`), the labels a submission is scored against (`ground_truth`), the commands
`predict`, `evaluate` and `thresholds`, and the report's figures (`report`). The metric itself and
threshold tuning are pure (`cocoshard.pure.metrics`, `cocoshard.pure.threshold_tuning`).

May import: everything earlier in the flow (`prepare`, `loading`, `training`), `cocoshard.pure` and
the foundation modules.
"""
