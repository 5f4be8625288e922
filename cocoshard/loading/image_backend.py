"""Which library decodes images: torchcodec where it is installed and loads, torchvision otherwise.

    from cocoshard.loading.image_backend import BACKEND
    chw = BACKEND.decode_jpeg(data)                  # uint8 (3, H, W) RGB, EXIF orientation applied
    pictures = BACKEND.decode_jpegs(batch, device)   # one batched call (nvJPEG on CUDA)
    BACKEND.describe()                               # what `cocoshard info` prints

torchvision 0.29 deprecates its image decoders in favour of torchcodec (>= 0.17: libjpeg-turbo on the
CPU, nvJPEG on CUDA, `pip install cocoshard[decode]`). Both decode the same pixels on a CPU (the same
libjpeg-turbo; `tests/loading/test_image_backend.py` checks every real photo of the repository), so
which one runs changes the speed of nothing and the pixels of nothing. `COCOSHARD_DECODER=torchvision`
(or `torchcodec`) forces one; a forced backend that does not load falls back to the other, and
`describe()` says so.

EXIF orientation is applied by both CPU decoders (torchcodec always does; torchvision is asked to):
cocoshard shows every image upright, in pack, in the loaders and in predict (docs/format.md).
`decode_jpegs` on CUDA is given only images without an EXIF rotation (`device_decode` decodes the
few others on the host), since torchvision's nvJPEG path ignores the orientation.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
import torchvision.io as tvio
from PIL import Image

# torchvision 0.29 marks its image decoders deprecated on every call; they work, and they are the
# fallback where torchcodec does not load.
TORCHVISION_DECODER_NOTICE = "The image decoding and encoding capabilities of TorchVision are deprecated"
warnings.filterwarnings("ignore", message=TORCHVISION_DECODER_NOTICE, category=DeprecationWarning)

BACKENDS = ("torchcodec", "torchvision")
CHOICE_VARIABLE = "COCOSHARD_DECODER"

DecodeOne = Callable[[torch.Tensor], torch.Tensor]
DecodeBatch = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


@dataclass(frozen=True)
class ImageBackend:
    """One library's image decoders, each taking 1-D uint8 CPU tensors of encoded bytes."""

    name: str  # "torchcodec" or "torchvision"
    version: str
    decode_jpeg: DecodeOne  # -> uint8 (3, H, W) RGB on the CPU, EXIF orientation applied
    decode_jpegs: DecodeBatch  # a batch -> a list of uint8 (3, H, W) RGB on `device`
    decode_png: DecodeOne  # -> uint8 (3, H, W) RGB on the CPU
    why: str = ""  # why this one runs, when it is not the first choice

    def describe(self) -> str:
        """'torchcodec 0.17.0' or 'torchvision 0.29.1 (torchcodec is not installed)'."""
        return f"{self.name} {self.version}" + (f" ({self.why})" if self.why else "")


def _torchvision(why: str = "") -> ImageBackend:
    rgb = tvio.ImageReadMode.RGB

    def decode_jpeg(data: torch.Tensor) -> torch.Tensor:
        return tvio.decode_jpeg(data, mode=rgb, apply_exif_orientation=True)

    def decode_jpegs(batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        decoded = tvio.decode_jpeg(batch, mode=rgb, device=device)
        return decoded if isinstance(decoded, list) else [decoded]

    def decode_png(data: torch.Tensor) -> torch.Tensor:
        return tvio.decode_png(data, mode=rgb)

    return ImageBackend(
        "torchvision", torchvision.__version__.split("+")[0], decode_jpeg, decode_jpegs, decode_png, why
    )


def _torchcodec(why: str = "") -> ImageBackend:
    """torchcodec's decoders; ImportError, OSError or RuntimeError when it is missing or does not load
    (a build for another torch fails when its libraries load)."""
    import torchcodec
    from torchcodec.decoders import decode_jpeg as codec_jpeg
    from torchcodec.decoders import decode_png as codec_png

    def decode_jpeg(data: torch.Tensor) -> torch.Tensor:
        decoded = codec_jpeg(data, mode="RGB")
        assert isinstance(decoded, torch.Tensor)  # one image in, one out
        return decoded

    def decode_jpegs(batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        decoded = codec_jpeg(batch, mode="RGB", device=device)
        return decoded if isinstance(decoded, list) else [decoded]

    def decode_png(data: torch.Tensor) -> torch.Tensor:
        return codec_png(data, mode="RGB")

    decode_jpeg(_probe_jpeg())  # loading the library is not enough: decode one image
    return ImageBackend(
        "torchcodec", torchcodec.__version__.split("+")[0], decode_jpeg, decode_jpegs, decode_png, why
    )


def _probe_jpeg() -> torch.Tensor:
    """A tiny JPEG made here (8 x 8 grey) for the torchcodec probe."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="JPEG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def load_backend(name: str) -> ImageBackend:
    """The backend `name` ("torchcodec" or "torchvision"); torchcodec raises when it cannot run here."""
    if name == "torchvision":
        return _torchvision()
    if name == "torchcodec":
        return _torchcodec()
    raise ValueError(f"unknown image backend {name!r}: one of {', '.join(BACKENDS)}")


def _torchcodec_or_why(why: str = "") -> ImageBackend | str:
    """torchcodec's backend, or why it cannot run here, in a few words."""
    try:
        return _torchcodec(why)
    except ImportError:
        return "torchcodec is not installed"
    except (OSError, RuntimeError, AttributeError) as exc:  # a build that does not match this torch
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return f"torchcodec does not load here: {first}"


def choose_backend(wanted: str | None = None) -> ImageBackend:
    """torchcodec where it loads, else torchvision; `wanted` (or $COCOSHARD_DECODER) forces one."""
    wanted = (wanted if wanted is not None else os.environ.get(CHOICE_VARIABLE, "")).strip().lower()
    note = ""
    if wanted not in ("", *BACKENDS):
        note = f"{CHOICE_VARIABLE}={wanted!r} is not one of {', '.join(BACKENDS)}"
    if wanted == "torchvision":
        return _torchvision(f"{CHOICE_VARIABLE}=torchvision")
    found = _torchcodec_or_why(note)
    if isinstance(found, ImageBackend):
        return found
    return _torchvision("; ".join(filter(None, (note, found))))


BACKEND = choose_backend()
