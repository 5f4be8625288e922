"""Mosaic Streaming: `MDSWriter` shards, then `StreamingDataset` in a PyTorch DataLoader.

Each sample is stored as the source JPEG bytes with its labels and key; the dataset's
`__getitem__` decodes with torchvision (libjpeg-turbo) and augments the uint8 tensor with
torchvision's v2 transforms, in the DataLoader's workers, as Streaming's examples do. float32 NCHW,
made channels_last on arrival.
"""

from __future__ import annotations

import torch
from pipelines import Pipeline

from peers.common import PeerUnavailable, dataloader_epochs, tensor_transform, version


def _written(data) -> str:
    from streaming import MDSWriter

    out = data.cache / "mosaic"
    if not (out / "index.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        columns = {"image": "bytes", "labels": "ndarray:uint8", "key": "str"}
        with MDSWriter(out=str(out), columns=columns, size_limit="16mb") as writer:
            for key in data.keys:
                writer.write(
                    {
                        "image": (data.images / f"{key}.jpg").read_bytes(),
                        "labels": data.labels[key],
                        "key": key,
                    }
                )
    return str(out)


def build(data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    release = version("mosaicml-streaming")
    try:
        import streaming
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        raise PeerUnavailable(f"mosaicml-streaming does not import: {exc}") from None
    local = _written(data)
    transform = tensor_transform(size)

    class Augmented(streaming.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            image = decode_jpeg(
                torch.frombuffer(bytearray(sample["image"]), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
            return transform(image), torch.as_tensor(sample["labels"]), sample["key"]

    streaming.base.util.clean_stale_shared_memory()
    dataset = Augmented(local=local, shuffle=True, shuffle_seed=0, batch_size=batch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )

    epoch = dataloader_epochs(loader, device)
    return Pipeline(
        "mosaic",
        epoch,
        "float32 channels_last",
        torch.float32,
        version=release,
        peer=True,
        notes="MDSWriter shards of JPEG bytes; torchvision decode + v2 transforms per sample in "
        "DataLoader workers",
    )
