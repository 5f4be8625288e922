"""training: `cocoshard train`, the model fitted on loader batches, with its checkpoints.

Owns: models by name (`model`), losses (`loss`), optimiser, schedule and EMA (`optim`), device,
DDP and mixed precision (`runtime`), what a checkpoint holds and resuming from one
(`checkpoint`), the run's objects (`state`), the epochs (`loop`) and what a run writes and shows
(`runlog`).

May import: the foundation modules, `prepare` and `loading`; never `scoring` (the loop's
validation scores with `scoring.metrics`, which is pure and sits below: see the layer test).
"""
