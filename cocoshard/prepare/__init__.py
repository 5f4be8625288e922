"""prepare: the challenge folder, read once, into WebDataset shards and a manifest (`cocoshard pack`).

Owns: the challenge's inputs (`sources`, `labels`), the generated stand-in (`synth`), the shard
format (`format`, `manifest`), the train/val split (`split`), packing (`pack`, `pool`) and checking
packed shards (`inspect`, `summary`).

May import: the foundation modules at the top of the package (`errors`, `atomic`, `machine`,
`seeds`, `config`) and other `prepare` modules; never `loading`, `training` or `scoring`.
"""
