"""Models by name, the 80-way head, its prior bias, freezing, and the three kinds of --weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from cocoshard import NUM_CLASSES
from cocoshard.errors import ConfigError, UserError
from cocoshard.training.model import (
    available_models,
    build_model,
    check_input_size,
    head_layer_name,
    head_prefix,
    imagenet_cache_path,
    prior_logits,
    set_backbone_trainable,
    set_train_mode,
)

REQUIRED = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_1_6gf",
    "maxvit_t",
    "cocoshard_tiny",
]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_required_model_builds_with_an_80_way_head(name: str) -> None:
    prior = torch.linspace(0.01, 0.5, NUM_CLASSES)
    model = build_model(name, "none", class_prior=prior).eval()
    head = model.get_submodule(head_layer_name(model))
    assert head.out_features == NUM_CLASSES
    assert torch.allclose(head.bias, prior_logits(prior))
    size = 224 if name == "maxvit_t" else 64
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size))
    assert out.shape == (2, NUM_CLASSES)
    assert name in available_models()


def test_prior_bias_gives_the_prevalence_as_initial_probability() -> None:
    prior = torch.tensor([0.5, 0.1, 0.001] + [0.2] * (NUM_CLASSES - 3))
    assert torch.allclose(torch.sigmoid(prior_logits(prior)), prior, atol=1e-6)
    assert torch.isfinite(prior_logits(torch.tensor([0.0, 1.0]))).all()


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("resnet81", "none")
    with pytest.raises(ConfigError, match="unknown --model"):
        build_model("inception_v3", "none")


def test_head_is_the_top_level_child_of_the_last_linear() -> None:
    assert head_prefix(build_model("resnet18")) == "fc"
    assert head_prefix(build_model("mobilenet_v3_small")) == "classifier"
    assert head_layer_name(build_model("mobilenet_v3_small")) == "classifier.3"


def test_freezing_leaves_only_the_head_trainable_and_backbone_norms_in_eval() -> None:
    model = build_model("cocoshard_tiny")
    set_backbone_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    set_train_mode(model, backbone_frozen=True)
    assert model.fc.training and not model.stem[1].training
    set_backbone_trainable(model, True)
    set_train_mode(model, backbone_frozen=False)
    assert all(p.requires_grad for p in model.parameters()) and model.stem[1].training


def test_tiny_trains_in_bf16_channels_last_on_cpu() -> None:
    model = build_model("cocoshard_tiny").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, NUM_CLASSES)
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_local_imagenet_state_dict_loads_and_the_head_is_replaced(tmp_path: Path) -> None:
    import torchvision

    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == NUM_CLASSES


def test_local_80_class_checkpoint_keeps_its_head(tmp_path: Path) -> None:
    trained = build_model("cocoshard_tiny", class_prior=torch.full((NUM_CLASSES,), 0.3))
    path = tmp_path / "run.pt"
    # a DDP-style prefix, as a state dict saved from a wrapped model has
    torch.save({"model": {"module." + k: v for k, v in trained.state_dict().items()}}, path)
    model = build_model("cocoshard_tiny", str(path))
    assert torch.equal(model.fc.bias, trained.fc.bias)
    assert torch.equal(model.stem[0].weight, trained.stem[0].weight)


def test_a_checkpoint_with_an_ema_gives_its_averaged_weights(tmp_path: Path) -> None:
    raw, averaged = build_model("cocoshard_tiny"), build_model("cocoshard_tiny")
    path = tmp_path / "best.pt"
    torch.save({"model": raw.state_dict(), "ema": averaged.state_dict(), "epoch": 3}, path)
    model = build_model("cocoshard_tiny", str(path))
    assert torch.equal(model.stem[0].weight, averaged.stem[0].weight)
    assert not torch.equal(model.stem[0].weight, raw.stem[0].weight)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(build_model("cocoshard_tiny").state_dict(), path)
    with pytest.raises(
        UserError, match="weights of another architecture: 1 of their 80 tensors fit .* Give the --model"
    ) as refused:
        build_model("resnet18", str(path))
    assert "Missing key" not in str(refused.value) and len(str(refused.value)) < 400  # not PyTorch's key list
    checkpoint = tmp_path / "best.pt"
    torch.save(
        {"model": build_model("cocoshard_tiny").state_dict(), "config": {"model": "cocoshard_tiny"}},
        checkpoint,
    )
    with pytest.raises(
        UserError, match="a cocoshard checkpoint of cocoshard_tiny: give --model cocoshard_tiny"
    ):
        build_model("resnet18", str(checkpoint))
    with pytest.raises(ConfigError, match="no such file"):
        build_model("resnet18", str(tmp_path / "missing.pt"))


def test_weights_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload()}, path)
    with pytest.raises(UserError, match="weights_only=True"):
        build_model("resnet18", str(path))
    assert not marker.exists()


def test_imagenet_offline_fails_at_once_naming_the_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        assert imagenet_cache_path("mobilenet_v3_small").parent == tmp_path / "checkpoints"
        with pytest.raises(UserError) as info:
            build_model("mobilenet_v3_small", "imagenet")
    finally:
        torch.hub.set_dir(previous)
    assert "--weights none" in str(info.value) and "--weights PATH" in str(info.value)
    with pytest.raises(ConfigError, match="--weights none"):
        build_model("cocoshard_tiny", "imagenet")


def test_input_size_the_architecture_cannot_take_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--size 160"):
        check_input_size(build_model("maxvit_t"), 160, "maxvit_t")
    check_input_size(build_model("cocoshard_tiny"), 64, "cocoshard_tiny")
