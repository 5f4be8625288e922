"""prepare: the challenge folder, read once, into WebDataset shards and a manifest (`cocoshard pack`).

Owns: the challenge's inputs (`sources`), the generated stand-in (`synth`), the manifest
(`manifest`), packing (`pack`, `pool`) and checking packed shards (`inspect`, `summary`). The
labels' text, the shard format's names and codecs and the split are pure (`cocoshard.pure`).

May import: the foundation modules and `cocoshard.pure`; never `loading`, `training` or `scoring`.
"""
