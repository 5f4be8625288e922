"""pure: the rules of the data and the score, as functions on values (no I/O, no logging, no processes).

Owns: the `.cls` labels (`labels`), the shard format's names and codecs (`format`), the stratified
train/val split (`split`) and K folds (`folds`), which samples each rank and worker reads in an
epoch (`plan`), the leaderboard's metrics (`metrics`) and per-class threshold tuning
(`threshold_tuning`).

May import: the foundation modules and each other. Every stage (prepare, loading, training,
scoring) may import it: the easiest code to test exhaustively, kept where everything can use it.
"""
