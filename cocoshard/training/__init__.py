"""training: `cocoshard train`, the model fitted on loader batches, with its checkpoints.

Owns: models by name (`model`), losses (`loss`), optimiser, schedule and EMA (`optim`), device,
DDP and mixed precision (`runtime`), what a checkpoint holds and how it is read (`checkpoint`),
resuming a run (`resume`), checkpoints inside an epoch (`midepoch`), the run's objects and how
they are built (`trainer`), which shards a run reads and their checks (`run_shards`), scoring the
validation split each epoch (`validation`), signals and lost peers (`watchdog`), how a run stops
and what it says (`stopping`), the command and its epochs (`train`) and what a run writes and
shows (`runlog`; `screen` lays out its epochs).

May import: the foundation modules, `cocoshard.pure`, `prepare` and `loading`; never `scoring`
(validation scores with `cocoshard.pure.metrics`).
"""
