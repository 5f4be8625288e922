"""NVIDIA DALI: its file reader, decoder and fused crop/mirror/normalise, on the CPU here (the GPU there).

    readers.file(files, labels=indices, shuffle_after_epoch=True, pad_last_batch=True)
      -> decoders.image -> random_resized_crop -> crop_mirror_normalize(mirror=coin_flip, HWC float)

What it took: `random_shuffle` shuffles through a buffer that repeats and drops images within an
epoch; `shuffle_after_epoch=True` (which excludes it) with `pad_last_batch=True` gives exact
epochs. The iterator is
reset only when its next epoch starts, so its prefetching never runs during another pipeline's
turn. On a GPU (`device="cuda"`) the decoder is nvJPEG ("mixed") and the rest runs on the device.
float32, HWC, so the batch is channels_last NCHW without a copy.
"""

from __future__ import annotations

import torch
from pipelines import Pipeline

from peers.common import MEAN, RATIO, SCALE, STD, PeerUnavailable, imported_release, labels_of


def build(data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    release = imported_release(
        "nvidia.dali", "nvidia-dali", "bash tools/install-peers.sh installs the build for torch's CUDA"
    )
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as exc:
        raise PeerUnavailable(f"DALI does not import: {exc}") from None
    files = [str(data.images / f"{key}.jpg") for key in data.keys]
    on_gpu = device.type == "cuda"

    @pipeline_def(
        batch_size=batch, num_threads=workers, device_id=device.index or 0 if on_gpu else None, seed=0
    )
    def pipeline():
        jpegs, index = fn.readers.file(
            files=files,
            labels=list(range(len(files))),
            shuffle_after_epoch=True,
            pad_last_batch=True,
            name="reader",
        )
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        images = fn.random_resized_crop(
            images, size=(size, size), random_area=SCALE, random_aspect_ratio=RATIO
        )
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="HWC",
            mean=[m * 255 for m in MEAN],
            std=[s * 255 for s in STD],
            mirror=fn.random.coin_flip(),
        )
        return images, index

    built = pipeline()
    try:
        built.build()
    except RuntimeError as exc:
        raise PeerUnavailable(f"DALI cannot build its pipeline here: {str(exc).splitlines()[0]}") from None
    iterator = DALIGenericIterator(
        [built],
        ["images", "index"],
        reader_name="reader",
        last_batch_policy=LastBatchPolicy.DROP,
        auto_reset=False,
    )
    state = {"fresh": True}

    def epoch(number: int):
        if not state["fresh"]:
            iterator.reset()
        state["fresh"] = False
        for out in iterator:
            keys = [data.keys[i] for i in out[0]["index"].flatten().tolist()]
            yield out[0]["images"].permute(0, 3, 1, 2), labels_of(keys, data), keys

    return Pipeline(
        "dali",
        epoch,
        "float32 channels_last",
        torch.float32,
        version=release,
        peer=True,
        notes=f"{'GPU' if on_gpu else 'CPU'} pipeline; shuffle_after_epoch + pad_last_batch for exact "
        "epochs (random_shuffle repeats and drops images)",
    )
