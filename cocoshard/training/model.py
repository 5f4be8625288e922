"""Classifiers by name: torchvision backbones (and a small CPU net) with a new 80-way head.

    model = build_model("convnext_tiny", weights="imagenet", class_prior=prevalence)

Every model is first built with torchvision's 1000-class head so that ImageNet weights (or a local
state dict made for ImageNet) load unchanged; the last `nn.Linear` is then replaced by an 80-way
layer whose bias starts at the log-odds of each class's prevalence, so the first steps do not spend
themselves learning that most classes are absent. The "head" is the top-level child holding that
layer (`fc`, `classifier`, `heads`, ...): it is what trains alone while the backbone is frozen, and
what gets the full learning rate afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from cocoshard import NUM_CLASSES
from cocoshard.errors import ConfigError, UserError
from cocoshard.training.checkpoint import safe_load

IMAGENET_CLASSES = 1000
WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_NONE = "none"
# Models whose forward pass returns auxiliary outputs in training mode or that end in a
# convolution rather than a linear classifier: they do not fit one 80-way linear head.
UNSUPPORTED = frozenset({"googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1"})
DOWNLOAD_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------------- small CPU net


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a projected shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # Zero-initialised last norm: each block starts as the identity, which trains faster from scratch.
        nn.init.zeros_(self.bn2.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A compact ResNet (widths 32-64-128-256, one block per stage) that trains from scratch on a CPU.

    The stem halves the resolution twice (stride-2 convolution, then the first block), so a 96 px
    input ends as a 3x3 map: ~50 MFLOPs per image, a few hundred images/s of training on two cores.
    """

    def __init__(
        self, num_classes: int = IMAGENET_CLASSES, widths: Sequence[int] = (32, 64, 128, 256)
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, c_in = [], widths[0]
        for width in widths:
            stages.append(_BasicBlock(c_in, width, stride=2))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


# Models built here rather than by torchvision; they have no ImageNet weights.
LOCAL_MODELS: dict[str, Callable[[], nn.Module]] = {"cocoshard_tiny": TinyResNet}


# ----------------------------------------------------------------------------------- names


def available_models() -> list[str]:
    """Every model name `build_model` accepts."""
    import torchvision.models

    names = set(torchvision.models.list_models(module=torchvision.models)) - UNSUPPORTED
    return sorted(names | set(LOCAL_MODELS))


def check_model_name(name: str) -> None:
    """Raise a ConfigError that lists the choices when `name` is not a model we can build."""
    if name in LOCAL_MODELS or name in available_models():
        return
    import difflib

    close = difflib.get_close_matches(name, available_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown --model {name!r}{hint}; choose one of: {', '.join(available_models())}")


def _build_architecture(name: str) -> nn.Module:
    check_model_name(name)
    if name in LOCAL_MODELS:
        return LOCAL_MODELS[name]()
    import torchvision.models

    return torchvision.models.get_model(name, weights=None)


# ----------------------------------------------------------------------------------- head


def head_layer_name(model: nn.Module) -> str:
    """Qualified name of the classifier: the last `nn.Linear` registered in the model."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to replace with an 80-way head")
    return names[-1]


def head_prefix(model: nn.Module) -> str:
    """The top-level child that holds the classifier (`fc`, `classifier`, `heads`, ...)."""
    return head_layer_name(model).split(".")[0]


def is_head_parameter(name: str, prefix: str) -> bool:
    """True for a parameter name (as from `named_parameters`) that belongs to the head."""
    return name == prefix or name.startswith(prefix + ".")


def _set_submodule(model: nn.Module, qualified: str, module: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def prior_logits(class_prior: torch.Tensor | Sequence[float], floor: float = 1e-4) -> torch.Tensor:
    """Log-odds of each class's prevalence, clamped away from 0 and 1."""
    p = torch.as_tensor(class_prior, dtype=torch.float32).clamp(floor, 1.0 - floor)
    return torch.log(p / (1.0 - p))


def replace_head(
    model: nn.Module, num_classes: int = NUM_CLASSES, class_prior: Sequence[float] | None = None
) -> nn.Module:
    """Swap the last linear layer for a `num_classes` one; its bias starts at the prior's log-odds."""
    name = head_layer_name(model)
    old = model.get_submodule(name)
    assert isinstance(old, nn.Linear)  # head_layer_name names the last nn.Linear
    head = nn.Linear(old.in_features, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    with torch.no_grad():
        head.bias.copy_(prior_logits(class_prior) if class_prior is not None else torch.zeros(num_classes))
    _set_submodule(model, name, head)
    return model


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze every parameter outside the head (the head always trains)."""
    prefix = head_prefix(model)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable or is_head_parameter(name, prefix))


def set_train_mode(model: nn.Module, backbone_frozen: bool) -> None:
    """Training mode; a frozen backbone stays in eval mode so its norm statistics stay pretrained."""
    model.train()
    if backbone_frozen:
        prefix = head_prefix(model)
        for name, child in model.named_children():
            if name != prefix:
                child.eval()


# ----------------------------------------------------------------------------------- weights


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add to parameter names."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a bare state dict, or a checkpoint holding one: a cocoshard
    checkpoint's weights its epoch selected (`weights`; the EMA in one from before that field),
    else `model`, `state_dict` or `model_state_dict`. Loaded with `weights_only=True`."""
    return _read_weights(path)[0]


def _read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """(`read_state_dict`'s state dict, the model a cocoshard checkpoint says it holds, or None)."""
    data = safe_load(path, what="weights file")
    config = data.get("config") if isinstance(data, dict) else None
    made_for = config.get("model") if isinstance(config, dict) else None
    selected = data.get("weights") if isinstance(data, dict) else None
    first = [selected] if selected in ("ema", "model") and "ema" in data else []
    for key in (*first, "ema", "model", "state_dict", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return strip_wrapper_prefixes(data), made_for if isinstance(made_for, str) else None


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load `state` into `model` exactly; weights of another architecture are said as such, with
    how many of their tensors fit and the way on (`hint`), not PyTorch's list of every key."""
    own = model.state_dict()
    fitting = sum(1 for key, value in state.items() if key in own and own[key].shape == value.shape)
    if fitting == len(state) == len(own):
        model.load_state_dict(state, strict=True)
        return
    lacking = next((key for key in own if key not in state), None)
    foreign = next((key for key in state if key not in own), None)
    shapes = next((key for key in state if key in own and own[key].shape != state[key].shape), None)
    example = (
        f"it lacks {lacking!r}"
        if lacking
        else f"{foreign!r} is not in this model"
        if foreign
        else f"{shapes!r} has shape {tuple(state[shapes].shape)}, the model's {tuple(own[shapes].shape)}"
        if shapes
        else "its keys and shapes differ"
    )
    raise UserError(
        f"{source} are weights of another architecture: {fitting} of their {len(state)} tensors fit "
        f"this --model's {len(own)} ({example}).{hint}"
    )


def load_local_weights(model: nn.Module, path: str | os.PathLike, name: str = "") -> nn.Module:
    """Load a local state dict into a 1000-class model; an 80-class file replaces the head first.

    The model keeps a 1000-class head when the file had one (`build_model` then replaces it) and
    gets the file's own 80-way head otherwise."""
    state, made_for = _read_weights(path)
    head_weight = state.get(head_layer_name(model) + ".weight")
    if head_weight is not None and head_weight.shape[0] == NUM_CLASSES:
        replace_head(model)  # so that the file's 80-way head fits
    if made_for and made_for != name:
        hint = f" It is a cocoshard checkpoint of {made_for}: give --model {made_for}"
    else:
        hint = " Give the --model they were made for, or --weights imagenet (or none: from scratch)"
    _load_matching(model, state, f"--weights {path}", hint)
    return model


def imagenet_cache_path(name: str) -> Path:
    """Where torchvision's download cache keeps `name`'s default ImageNet weights."""
    import torchvision.models

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's downloader opens its connection without a timeout; a dead network must fail fast.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights for `name`, through torchvision's download cache."""
    if name in LOCAL_MODELS:
        raise ConfigError(f"{name} has no ImageNet weights: train it from scratch with --weights none")
    import torchvision.models

    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = imagenet_cache_path(name)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return torch.hub.load_state_dict_from_url(
                weights.url,
                model_dir=str(cached.parent),
                map_location="cpu",
                check_hash=True,
                weights_only=True,
            )
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"cannot get ImageNet weights for {name} ({weights.url}): {exc}. Nothing is cached at {cached}. "
            f"Train from scratch with --weights none, or download the file elsewhere and pass --weights PATH "
            f"(or copy it to {cached})"
        ) from exc


# ----------------------------------------------------------------------------------- entry point


def build_model(
    name: str,
    weights: str = WEIGHTS_NONE,
    class_prior: Sequence[float] | None = None,
    num_classes: int = NUM_CLASSES,
) -> nn.Module:
    """A classifier with a `num_classes` head.

    weights: "imagenet" (torchvision's default weights, from its cache or downloaded), "none"
    (random initialisation) or the path of a local state dict (`weights_only=True`; a 1000-class
    ImageNet head or an 80-class head of an earlier run are both accepted).
    class_prior: each class's prevalence in the training data; the head's bias starts at its log-odds.
    """
    model = _build_architecture(name)
    if weights == WEIGHTS_IMAGENET:
        _load_matching(model, imagenet_state_dict(name), f"ImageNet weights of {name}")
    elif weights != WEIGHTS_NONE:
        if not Path(weights).is_file():
            raise ConfigError(
                f"--weights {weights!r}: no such file; use imagenet, none, or the path of a state dict"
            )
        load_local_weights(model, weights, name)
    last = model.get_submodule(head_layer_name(model))
    if last.out_features != num_classes:
        replace_head(model, num_classes, class_prior)
    return model


def check_input_size(model: nn.Module, size: int, name: str) -> None:
    """Run one image of `size` px through the model so a size the architecture rejects fails now."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"--model {name} cannot take --size {size}: {exc}. Most torchvision models take any "
            f"size from 64 up; maxvit_t and vit_* need 224"
        ) from exc
    finally:
        model.train(was_training)
