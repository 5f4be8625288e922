"""LitData: `optimize` into its chunked format, then `StreamingDataset` + `StreamingDataLoader`.

Each sample is stored as the source JPEG bytes with its labels and key; a worker decodes it with
torchvision (libjpeg-turbo) and augments the uint8 tensor with torchvision's v2 transforms (the
fastest way torchvision offers). What it took: `optimize` switches the whole process to the
"spawn" start method, so it runs in a child process of its own. float32 NCHW, made channels_last
on arrival.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from pipelines import Pipeline

from peers.common import PeerUnavailable, dataloader_epochs, tensor_transform, version

_OPTIMIZE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import litdata

    images, labels_dir, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    keys = sys.argv[5].split(",")

    def sample(key):
        labels = np.zeros(80, np.uint8)
        labels[[int(line) for line in (labels_dir / f"{key}.cls").read_text().split()]] = 1
        return {"image": (images / f"{key}.jpg").read_bytes(), "labels": labels, "key": key}

    if __name__ == "__main__":
        litdata.optimize(fn=sample, inputs=keys, output_dir=out, chunk_bytes="16MB", num_workers=workers)
""")


def _optimized(data, workers: int):
    from cocoshard.prepare.sources import find_sources

    out = data.cache / "litdata"
    if not (out / "index.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        script = data.cache / "litdata_optimize.py"
        script.write_text(_OPTIMIZE)
        labels = find_sources(str(data.root)).train_labels
        subprocess.run(
            [
                sys.executable,
                str(script),
                str(data.images),
                str(labels),
                str(out),
                str(workers),
                ",".join(data.keys),
            ],
            check=True,
            capture_output=True,
        )
    return out


def build(data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    release = version("litdata")
    try:
        import litdata
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        raise PeerUnavailable(f"litdata does not import: {exc}") from None
    out = _optimized(data, workers)
    transform = tensor_transform(size)

    class Augmented(litdata.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            encoded = torch.frombuffer(bytearray(sample["image"]), dtype=torch.uint8)
            image = decode_jpeg(encoded, mode=ImageReadMode.RGB)
            return transform(image), torch.as_tensor(sample["labels"]), sample["key"]

    dataset = Augmented(str(out), shuffle=True, drop_last=True, seed=0)
    loader = litdata.StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True)

    epoch = dataloader_epochs(loader, device)
    return Pipeline(
        "litdata",
        epoch,
        "float32 channels_last",
        torch.float32,
        version=release,
        peer=True,
        notes="optimize (in its own process: it switches to spawn) to JPEG bytes; torchvision decode "
        "+ v2 transforms per sample in StreamingDataLoader workers",
    )
