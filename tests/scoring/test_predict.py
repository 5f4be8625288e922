"""`cocoshard predict` on the real sample's test photos, from a folder and from shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cocoshard import CLASSES, cli, config, config_scoring
from cocoshard.errors import UserError
from cocoshard.loading.augment import eval_transform
from cocoshard.loading.image_files import folder_batches, list_images
from cocoshard.scoring import predict
from cocoshard.scoring.scores import read_scores
from cocoshard.scoring.submission import load_submission
from cocoshard.settings import resolve, to_dict
from cocoshard.training.checkpoint import save_checkpoint
from cocoshard.training.model import build_model

TEST_IMAGES = Path("images/test-resized/test-resized")
SIZE = 64
BIASED_CLASS = 7


def make_checkpoint(
    path: Path, *, ema_bias_class: int | None = None, seed: int = 0, weights: str | None = None
) -> Path:
    """A checkpoint as `cocoshard train` writes it, for a small untrained model.

    With `ema_bias_class`, the EMA weights (and only they) push that class's logit far up, so a
    test can tell which weights were loaded. `weights` records which its epoch selected (None: a
    checkpoint from before that field).
    """
    torch.manual_seed(seed)
    model = build_model("cocoshard_tiny", weights="none")
    ema = None
    if ema_bias_class is not None:
        ema = {k: v.clone() for k, v in model.state_dict().items()}
        ema["fc.bias"][ema_bias_class] = 50.0
    train_cfg = to_dict(
        resolve(config.TrainConfig, {"model": "cocoshard_tiny", "size": SIZE, "weights": "none"})
    )
    state = {
        "model": model.state_dict(),
        "ema": ema,
        "epoch": 1,
        "step": 10,
        "config": train_cfg,
        "classes": list(CLASSES),
        "thresholds": [0.5] * 80,
        "metrics": {"server_f1_tuned": 0.321},
    }
    if weights is not None:
        state["weights"] = weights
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def predict_cfg(**settings) -> config_scoring.PredictConfig:
    return resolve(config_scoring.PredictConfig, {"workers": 2, "batch_size": 8, "device": "cpu", **settings})


def test_folder_of_real_photos_gives_a_strictly_valid_file(tmp_path, coco_sample, checkpoint) -> None:
    out, scores = tmp_path / "predictions.json", tmp_path / "scores.npz"
    folder = coco_sample / TEST_IMAGES
    assert (
        predict.run(
            predict_cfg(checkpoint=str(checkpoint), images=str(folder), out=str(out), scores=str(scores))
        )
        == 0
    )
    stems = sorted(p.stem for p in folder.glob("*.jpg"))
    submission = load_submission(out, expected=stems)  # raises on any format problem
    assert len(submission) == 32
    assert all(len(ids) >= 1 for ids in submission.values())  # --min-labels 1 by default
    found = read_scores(scores)
    keys, probabilities = found.keys, found.scores
    assert sorted(keys) == stems and probabilities.shape == (32, 80)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    text = out.read_text()
    assert text.startswith('{\n    "') and json.loads(text) == submission


def test_shards_give_the_same_scores_as_the_folder(
    tmp_path, coco_sample, sample_shards_jpeg, checkpoint
) -> None:
    common = {"checkpoint": str(checkpoint), "amp": False}
    predict.run(
        predict_cfg(
            **common,
            images=str(coco_sample / TEST_IMAGES),
            out=str(tmp_path / "a.json"),
            scores=str(tmp_path / "a.npz"),
        )
    )
    predict.run(
        predict_cfg(
            **common,
            shards=str(sample_shards_jpeg),
            split="test",
            out=str(tmp_path / "b.json"),
            scores=str(tmp_path / "b.npz"),
        )
    )
    found_a, found_b = read_scores(tmp_path / "a.npz"), read_scores(tmp_path / "b.npz")
    (keys_a, scores_a), (keys_b, scores_b) = (found_a.keys, found_a.scores), (found_b.keys, found_b.scores)
    assert len(keys_b) == 32 and sorted(keys_a) == sorted(keys_b)
    order = [keys_b.index(k) for k in keys_a]
    np.testing.assert_allclose(scores_a, scores_b[order], atol=1e-4)  # same bytes, same decode, same resize
    load_submission(tmp_path / "b.json", expected=keys_a)


def test_threshold_one_leaves_only_the_top_class_of_each_image(tmp_path, coco_sample, checkpoint) -> None:
    out = tmp_path / "p.json"
    predict.run(
        predict_cfg(
            checkpoint=str(checkpoint),
            images=str(coco_sample / TEST_IMAGES),
            out=str(out),
            threshold=1.0,
            min_labels=2,
            scores=str(tmp_path / "s.npz"),
        )
    )
    submission = load_submission(out)
    found = read_scores(tmp_path / "s.npz")
    keys, scores = found.keys, found.scores
    for key, row in zip(keys, scores):
        assert submission[key] == sorted(np.argsort(-row, kind="stable")[:2].tolist())


def test_ema_weights_are_used_when_present(tmp_path, coco_sample) -> None:
    ckpt = make_checkpoint(tmp_path / "ema.pt", ema_bias_class=BIASED_CLASS)
    out = tmp_path / "p.json"
    predict.run(
        predict_cfg(
            checkpoint=str(ckpt),
            images=str(coco_sample / TEST_IMAGES),
            out=str(out),
            threshold=0.99,
            min_labels=0,
        )
    )
    assert all(ids == [BIASED_CLASS] for ids in load_submission(out).values())


def test_the_weights_the_epoch_selected_are_used_and_said(tmp_path, coco_sample, capsys) -> None:
    """last.pt of an epoch that selected the raw model predicts with the raw model, not the EMA;
    best.pt holds only the selected weights; predict says which epoch, weights and score it uses."""
    last = make_checkpoint(tmp_path / "last.pt", ema_bias_class=BIASED_CLASS, weights="model")
    best = make_checkpoint(tmp_path / "best.pt", ema_bias_class=BIASED_CLASS, weights="ema")
    state = torch.load(best, weights_only=True)
    state["model"] = state.pop("ema")  # what best.pt holds: the selected weights under `model`
    save_checkpoint(best, state)
    for checkpoint, biased, said in ((last, False, "raw (not EMA) weights"), (best, True, "EMA weights")):
        out = tmp_path / f"{checkpoint.stem}.json"
        settings = dict(images=str(coco_sample / TEST_IMAGES), out=str(out), threshold=0.99, min_labels=0)
        predict.run(predict_cfg(checkpoint=str(checkpoint), **settings))
        assert all(ids == [BIASED_CLASS] for ids in load_submission(out).values()) == biased
        text = " ".join(capsys.readouterr().err.split())
        assert f"epoch 1 of 12, {said}, val server F1 0.3210" in text, text


def test_tta_averages_the_image_and_its_mirror(coco_sample, checkpoint) -> None:
    predictor = predict.load_predictor(checkpoint, torch.device("cpu"))
    folder = coco_sample / TEST_IMAGES

    def scores(tta: bool, flip_input: bool = False) -> np.ndarray:
        files = list_images(folder)
        batches = folder_batches(files, 224, 16, 0, torch.device("cpu"))
        if flip_input:
            batches = ((_mirror(images, sizes), sizes, keys) for images, sizes, keys in batches)
        ready = (
            (eval_transform(images, sizes, out_size=predictor.size), keys) for images, sizes, keys in batches
        )
        return predict.predict_scores(
            predictor, ready, total=len(files), amp_dtype=None, tta=tta, progress=False
        )[1]

    plain, mirrored, averaged = scores(False), scores(False, flip_input=True), scores(True)
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, atol=1e-5)
    assert not np.allclose(plain, mirrored, atol=1e-4)  # real photos are not symmetric


def _mirror(images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right inside its own region of the top-left canvas."""
    out = images.clone()
    for i, (height, width) in enumerate(sizes.tolist()):
        out[i, :height, :width] = images[i, :height, :width].flip(1)
    return out


def test_a_corrupt_image_is_named(tmp_path, coco_sample, checkpoint) -> None:
    folder = tmp_path / "images"
    shutil.copytree(coco_sample / TEST_IMAGES, folder)
    bad = sorted(folder.glob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(UserError, match=bad.stem):
        predict.run(predict_cfg(checkpoint=str(checkpoint), images=str(folder), out=str(tmp_path / "p.json")))
    assert not (tmp_path / "p.json").exists()


def test_an_images_folder_one_level_short_or_a_shards_folder_names_the_flag_to_give(
    tmp_path, coco_sample, checkpoint, sample_shards_jpeg
) -> None:
    short = coco_sample / TEST_IMAGES.parent  # the zip doubles its folder names
    with pytest.raises(
        UserError, match=f"its folder test-resized holds 32: give --images {short / 'test-resized'}"
    ):
        predict.run(predict_cfg(checkpoint=str(checkpoint), images=str(short), out=str(tmp_path / "p.json")))
    with pytest.raises(UserError, match=f"is a shards folder .*: read it with --shards {sample_shards_jpeg}"):
        predict.run(predict_cfg(checkpoint=str(checkpoint), images=str(sample_shards_jpeg)))


def test_bad_inputs_are_user_errors(tmp_path, checkpoint, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        predict.run(predict_cfg(checkpoint=str(checkpoint), images=str(empty)))
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="lacks"):
        predict.run(predict_cfg(checkpoint=str(tmp_path / "partial.pt"), images=str(empty)))
    assert cli.main(["predict", "--checkpoint", str(checkpoint)]) == 2
    assert "exactly one of --shards" in capsys.readouterr().err


def test_a_fold_of_a_k_fold_pack_is_a_split_to_predict(tmp_path, sample_folds_jpeg, checkpoint) -> None:
    from cocoshard.scoring.ground_truth import load_labels

    for split, expected in (("fold1", load_labels(sample_folds_jpeg, "fold1")), ("fold0+fold2", None)):
        out, scores = tmp_path / f"{split}.json", tmp_path / f"{split}.npz"
        args = [
            "--shards",
            str(sample_folds_jpeg),
            "--split",
            split,
            "--out",
            str(out),
            "--scores",
            str(scores),
        ]
        assert cli.main(["predict", "--checkpoint", str(checkpoint), *args, "--workers", "0"]) == 0
        found = read_scores(scores)
        assert found.split == split
        wanted = expected or {
            **load_labels(sample_folds_jpeg, "fold0"),
            **load_labels(sample_folds_jpeg, "fold2"),
        }
        assert sorted(found.keys) == sorted(wanted) == sorted(json.loads(out.read_text()))
