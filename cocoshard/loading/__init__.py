"""loading: shards -> training-ready batches on the device (`build_loader(location, split, spec)`).

Owns, in the order a batch meets them: the contract (`spec`: `LoaderSpec`, `Loader`; `loader`:
`build_loader`; `batch`: `HostBatch`, `Batch`); the host side, where batches are made (`tario`
reads a shard, `decode` its samples, `shard_source` is what a stream worker does, `worker_side`
runs in each worker process, `worker_pool` is the trainer's side of them, `buffers` the slots they
fill); the boundary (`to_device`); the device side (`device_decode`, `augment` draws the crops,
`resample` resizes and normalises them); and the loaders that compose them (`pipeline`, `stream`,
`resident`, `gpu_resident`, `resident_bytes`). `image_files` is a folder of images for predict.

May import: the foundation modules, `cocoshard.pure` (the epoch plan, the shard format) and
`prepare` (the manifest); never `training` or `scoring`.
"""
