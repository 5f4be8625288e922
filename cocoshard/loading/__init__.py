"""loading: shards -> training-ready batches on the device (`build_loader`, `train_augment`).

Owns: the tar reader (`tario`), sample decoding (`decode`), the batch type (`batch`), batch
buffers (`buffers`), the two loaders (`stream`, `resident`) and their factory (`loader`), a folder
of image files for predict (`image_files`), and augmentation on the device (`augment` draws the
crops, `resample` resizes and normalises them).

May import: the foundation modules, `cocoshard.pure` (the epoch plan, the shard format) and
`prepare` (the manifest); never `training` or `scoring`.
"""
