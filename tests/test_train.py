"""The training loop on a tiny learnable set: it learns, stops early on a plateau keeping the best weights,
is seeded, and a killed-then-resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from pipeline.model import SpinalVGG
from pipeline.stages import train as training
from pipeline.training import loop
from pipeline.training.bundle import load_bundle, predict_logits, save_bundle, select_device
from pipeline.training.checkpoint import fingerprint, load
from pipeline.training.plan import class_weights, ema_decay_at, make_scheduler, make_weight_average, plan_steps
from pipeline.training.records import EpochMetrics, TrainingDiverged

NUM_CLASSES = 4
PIXEL_MEAN, PIXEL_STD = 0.15, 0.3


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    labels: np.ndarray


def blobs(per_class: list[int], seed: int) -> Split:
    """Noise with a bright 8x8 square in a class-dependent quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(per_class)), per_class).astype(np.int64)
    images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        top, left = 4 + (label // 2) * 12 + rng.integers(-1, 2), 4 + (label % 2) * 12 + rng.integers(-1, 2)
        images[index, top:top + 8, left:left + 8] = 255
    return Split(images, labels)


@pytest.fixture(autouse=True)
def _few_threads(one_torch_thread):
    """Small tensors: one thread is faster and steadier on a shared 2-core machine."""


@pytest.fixture
def tiny(make_settings):
    def _make(**overrides):
        base = {"train.epochs": 3, "train.batch_size": 8, "train.optimizer": "adamw", "train.lr": 0.002,
                "train.warmup_fraction": 0.15,
                "train.ema_decay": 0.0, "train.patience": 10, "train.device": "cpu", "model.spinal_width": 16}
        return make_settings({**base, **{k.replace("__", "."): v for k, v in overrides.items()}})

    return _make


TRAIN, VAL = blobs([8, 8, 8, 8], seed=0), blobs([4, 4, 4, 4], seed=1)


def test_loss_falls_and_the_model_learns(tiny):
    settings = tiny()
    result = loop.fit(settings, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)
    losses = [m.train_loss for m in result.history]
    assert len(result.history) == 3 and not result.stopped_early
    assert losses[-1] < losses[0]
    assert result.best_val_balanced_accuracy >= 0.75  # chance is 0.25
    assert result.best.val_balanced_accuracy == result.best_val_balanced_accuracy
    assert set(result.history[0].as_dict()) == {"epoch", "train_loss", "val_loss", "val_accuracy",
                                                "val_balanced_accuracy", "lr", "seconds"}
    assert not result.model.training and next(result.model.parameters()).device.type == "cpu"


def test_early_stopping_restores_the_best_weights(tiny):
    # min_delta 1.0 cannot be beaten after the first epoch: patience 1 stops after epoch 2.
    settings = tiny(train__epochs=6, train__patience=1, train__min_delta=1.0)
    result = loop.fit(settings, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)
    assert result.stopped_early
    assert [m.epoch for m in result.history] == [1, 2]
    assert result.best_epoch == 1
    logits = torch.from_numpy(predict_logits(result.model, VAL.images, 7, "cpu"))
    val_loss = nn.functional.cross_entropy(logits, torch.from_numpy(VAL.labels)).item()
    assert val_loss == pytest.approx(result.history[0].val_loss, rel=1e-4)
    assert val_loss != pytest.approx(result.history[1].val_loss, rel=1e-4)


def _comparable(history):
    return [{k: v for k, v in m.as_dict().items() if k != "seconds"} for m in history]


class Killed(RuntimeError):
    pass


def test_killed_then_resumed_run_ends_where_an_uninterrupted_one_does(tiny, tmp_path):
    # EMA, sampler and augmentation on: every piece of RNG and averaged state has to survive the restart.
    settings = tiny(train__ema_decay=0.8, train__class_balance="sampler", train__optimizer="sgd",
                    train__lr=0.05, train__batch_size=12, augment__erasing_prob=0.5)
    imbalanced = blobs([10, 6, 4, 4], seed=2)
    whole = loop.fit(settings, imbalanced, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD,
                         checkpoint_path=tmp_path / "a.pt")

    def kill_after_epoch_2(metrics):
        if metrics.epoch == 2:
            raise Killed("simulated kill")

    checkpoint = tmp_path / "b.pt"
    with pytest.raises(Killed):
        loop.fit(settings, imbalanced, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD,
                     callbacks=[kill_after_epoch_2], checkpoint_path=checkpoint)
    seen = []
    resumed = loop.fit(settings, imbalanced, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD,
                           callbacks=[seen.append], checkpoint_path=checkpoint)

    assert [m.epoch for m in seen] == [3]  # only the epoch that was still to run
    assert _comparable(resumed.history) == _comparable(whole.history)
    assert resumed.best_epoch == whole.best_epoch
    expected, actual = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    # The EMA averaged the BatchNorm statistics too: they moved away from their initial values.
    assert not torch.allclose(actual["features.0.1.running_var"], torch.ones(64))


def test_without_validation_every_epoch_runs_the_last_is_kept_and_a_kill_resumes(tiny, tmp_path):
    """The refit's mode: nothing to select on, so no early stop (min_delta 1.0 would stop a validated run
    after epoch 2), no val metrics, the last epoch's weights; a killed run resumes to the same end."""
    settings = tiny(train__patience=1, train__min_delta=1.0, train__ema_decay=0.8)
    whole = loop.fit(settings, TRAIN, None, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD, checkpoint_path=tmp_path / "a.pt")
    assert [m.epoch for m in whole.history] == [1, 2, 3] and not whole.stopped_early
    assert whole.best_epoch == 3 and whole.best_val_balanced_accuracy is None
    assert set(whole.history[0].as_dict()) == {"epoch", "train_loss", "lr", "seconds"}
    last = torch.load(tmp_path / "a.pt", weights_only=True)["ema"]
    assert all(torch.equal(value, last[f"module.{key}"]) for key, value in whole.model.state_dict().items())

    def kill_after_epoch_1(metrics):
        if metrics.epoch == 1:
            raise Killed("simulated kill")

    with pytest.raises(Killed):
        loop.fit(settings, TRAIN, None, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD, callbacks=[kill_after_epoch_1],
                 checkpoint_path=tmp_path / "b.pt")
    resumed = loop.fit(settings, TRAIN, None, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD, checkpoint_path=tmp_path / "b.pt")
    assert _comparable(resumed.history) == _comparable(whole.history)
    expected, actual = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_warm_start_continues_from_the_given_weights(tiny):
    """The refit's default (train.refit_start: validated) starts where the validated model stands: at a
    vanishing learning rate it ends on those weights, a fresh start does not; and a checkpoint never
    crosses warm and fresh runs."""
    settings = tiny()
    trained = loop.fit(settings, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)
    start = trained.model.state_dict()
    standing_still = settings.with_overrides({"train.epochs": 1, "train.lr": 1e-12})
    warm = loop.fit(standing_still, TRAIN, None, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD, initial_weights=start)
    fresh = loop.fit(standing_still, TRAIN, None, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)
    for name, weight in trained.model.named_parameters():
        assert torch.allclose(dict(warm.model.named_parameters())[name], weight, atol=1e-6), name
    assert not torch.allclose(dict(fresh.model.named_parameters())["head.1.weight"],
                              start["head.1.weight"], atol=1e-3)
    fresh_print = fingerprint(standing_still, TRAIN, None, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)
    warm_print = fingerprint(standing_still, TRAIN, None, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD, start)
    assert warm_print != fresh_print


def test_the_refit_length_is_a_fraction_of_the_validated_run_rounded_up(tiny):
    assert [tiny(train__refit_epochs_fraction=0.5).train.refit_epochs(n) for n in (1, 2, 7, 12)] == [1, 1, 4, 6]
    assert tiny(train__refit_epochs_fraction=1.0).train.refit_epochs(7) == 7


def test_the_exported_model_counts_the_validated_epochs_it_continued(tiny):
    validated, refitted = SimpleNamespace(best_epoch=7), SimpleNamespace(best_epoch=12)
    assert training.model_epochs(tiny().train, validated, [refitted]) == 19  # refit_start: validated
    assert training.model_epochs(tiny(train__refit_start="scratch").train, validated, [refitted]) == 12
    assert training.model_epochs(tiny().train, validated, []) == 7  # no refit: the validated best epoch


def test_checkpoint_of_other_settings_is_not_resumed(tiny, tmp_path):
    settings = tiny(train__epochs=1)
    checkpoint = tmp_path / "run.pt"
    loop.fit(settings, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD, checkpoint_path=checkpoint)
    same = fingerprint(settings, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)
    assert load(checkpoint, same) is not None
    # Device and validation batch size do not change the trajectory; lr and the data do.
    portable = settings.with_overrides({"train.device": "auto", "train.eval_batch_size": 3})
    assert fingerprint(portable, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD) == same
    other_lr = settings.with_overrides({"train.lr": 0.01})
    assert fingerprint(other_lr, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD) != same
    flipped = Split(TRAIN.images.copy(), TRAIN.labels)
    flipped.images[0, 0, 0] ^= 1
    other_data = fingerprint(settings, flipped, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)
    assert other_data != same and load(checkpoint, other_data) is None
    # A truncated file is ignored (training starts fresh) instead of crashing the stage.
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert load(checkpoint, same) is None


def test_interrupted_stage_resumes_its_mlflow_run_only_for_the_same_fingerprint(tmp_path):
    import json

    checkpoint, marker = tmp_path / training.CHECKPOINT_FILE, tmp_path / training.CHECKPOINT_RUN_FILE
    marker.write_text(json.dumps({"run_id": "abc123", "fingerprint": "f1"}))
    assert training._resumable_run(checkpoint, marker, "f1") is None  # no checkpoint: nothing to resume
    checkpoint.write_bytes(b"x")
    assert training._resumable_run(checkpoint, marker, "f1") == "abc123"
    assert training._resumable_run(checkpoint, marker, "f2") is None
    marker.write_text("{not json")
    assert training._resumable_run(checkpoint, marker, "f1") is None


def test_divergence_stops_with_a_clear_error(tiny):
    settings = tiny(train__epochs=1, train__optimizer="sgd", train__lr=1e12, train__label_smoothing=0.0)
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        loop.fit(settings, TRAIN, VAL, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD)


def test_bad_training_data_is_rejected_with_a_clear_message(tiny):
    settings = tiny()
    with pytest.raises(ValueError, match="labels span"):
        loop.fit(settings, TRAIN, VAL, 3, PIXEL_MEAN, PIXEL_STD)
    with pytest.raises(ValueError, match="uint8"):
        loop.fit(settings, Split(TRAIN.images.astype(np.float32), TRAIN.labels), VAL, NUM_CLASSES,
                     PIXEL_MEAN, PIXEL_STD)


class FixedPredictions(nn.Module):
    """Predicts the class written in pixel (0, 0): a known confusion matrix for the metric check."""

    num_classes = NUM_CLASSES

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), NUM_CLASSES).float()


def test_validation_balanced_accuracy_matches_sklearn():
    labels = np.array([0] * 8 + [1] * 3 + [2] * 2 + [3] * 1)
    predicted = np.array([0] * 7 + [1] + [1, 1, 0] + [2, 3] + [3])
    images = np.zeros((len(labels), 28, 28), np.uint8)
    images[:, 0, 0] = predicted
    loss, accuracy, balanced = loop.validate(
        FixedPredictions(), torch.from_numpy(images), torch.from_numpy(labels), NUM_CLASSES, 5, False, False)
    assert balanced == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert accuracy == pytest.approx(np.mean(labels == predicted))
    assert balanced != pytest.approx(accuracy)
    assert math.isfinite(loss)


def test_class_weights_are_inverse_frequency_with_mean_one():
    weights = class_weights(np.array([0] * 6 + [1] * 3 + [2] * 1), 3)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[2] / weights[0] == pytest.approx(6.0)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step"])
def test_schedules_warm_up_peak_at_lr_and_decay(make_settings, schedule):
    cfg = make_settings({"train.schedule": schedule, "train.epochs": 10, "train.warmup_fraction": 0.2,
                         "train.lr": 0.1, "train.step_every": 4, "train.step_gamma": 0.5,
                         "train.batch_size": 8, "train.min_steps_per_epoch": 0}).train
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    plan = plan_steps(cfg, n_train=40)
    steps = plan.steps_per_epoch
    assert (steps, plan.warmup_steps) == (5, 10)
    scheduler, per_batch = make_scheduler(cfg, optimizer, plan)
    lrs = []
    for _ in range(cfg.epochs):
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_batch:
                scheduler.step()
        if not per_batch:
            scheduler.step()
    assert per_batch == (schedule != "step")
    assert max(lrs) == pytest.approx(cfg.lr, rel=1e-3)
    assert lrs[-1] <= 0.25 * cfg.lr
    if schedule != "step":  # linear warm-up over 2 epochs = 10 batches
        assert lrs[0] < 0.2 * cfg.lr and lrs[:10] == sorted(lrs[:10])
    else:
        assert lrs[steps * 4] == pytest.approx(cfg.lr * 0.5)


def test_bundle_round_trip_and_predict_logits(tmp_path):
    model = SpinalVGG(NUM_CLASSES, spinal_width=16, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD).eval()
    path = save_bundle(tmp_path / "model.pt", model, {"classes": ["あ", "い", "う", "え"]})
    loaded, meta = load_bundle(path)
    assert meta["classes"] == ["あ", "い", "う", "え"]
    assert meta["model"] == model.config()
    expected = predict_logits(model, VAL.images, 5, "cpu")
    assert expected.shape == (len(VAL.labels), NUM_CLASSES) and expected.dtype == np.float32
    # Same weights; only the batching differs (64 vs 5), which may move the last float bit.
    np.testing.assert_allclose(predict_logits(loaded, VAL.images, 64, "cpu"), expected,
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        direct = model(torch.from_numpy(VAL.images).float().unsqueeze(1)).numpy()
    np.testing.assert_allclose(expected, direct, rtol=1e-5, atol=1e-5)

    (tmp_path / "broken.pt").write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="not a valid model bundle"):
        load_bundle(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        load_bundle(tmp_path / "missing.pt")


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no cuda device"):
            select_device("cuda")


@pytest.mark.slow
def test_train_stage_writes_outputs_and_tracks_the_run(make_settings, monkeypatch):
    """``run`` on generated data: bundle, verified ONNX, reports, figures and one MLflow run with epochs."""
    import json

    import mlflow

    from pipeline.stages import download, prepare

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = make_settings({
        "data.dataset": "synthetic", "data.val_fraction": 0.2, "data.synthetic.train_per_class": 10,
        "data.synthetic.test_per_class": 2, "train.epochs": 2, "train.batch_size": 64,
        "train.max_train_per_class": 4, "train.max_val_per_class": 1, "train.device": "cpu",
        "model.spinal_width": 16, "model.tta_rotations_deg": [-4.0, 0.0, 4.0],
    })
    download.run(settings)
    prepare.run(settings)
    result = training.run(settings)

    models, reports = settings.path("models"), settings.path("reports")
    for path in [models / "model.pt", models / "model.onnx", models / "train_run.json",
                 models / "meta.json", models / "classmap.csv", reports / "train" / "history.csv",
                 reports / "train" / "metrics.json", reports / "figures" / "training_curves.png",
                 reports / "figures" / "augmented_samples.png"]:
        assert path.is_file() and path.stat().st_size > 0, path
    metrics = json.loads((reports / "train" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["n_train"] == 49 * 4 and metrics["num_classes"] == 49
    # The refit (train.refit, on by default): the exported model continued from the validated run's best
    # epoch on train + val for as many epochs as that run took.
    assert metrics["refit"] is True and metrics["model_epochs"] == metrics["best_epoch"] + 2
    assert metrics["model_train_images"] == 49 * 4 + 49 * 1
    history = (reports / "train" / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_loss,val_accuracy,val_balanced_accuracy,lr,seconds"
    assert len(history) == 3
    model, meta = load_bundle(models / "model.pt")
    assert meta["classes"][0] == "あ" and meta["model"]["num_classes"] == 49
    # The test-time views are in the exported model (bundle and ONNX alike), and meta.json says so.
    assert model.tta_rotations_deg == (-4.0, 0.0, 4.0) == tuple(meta["tta_rotations_deg"])
    # Calibration fitted on the validated model's validation logits, baked into the exported model.
    trust = json.loads((models / "meta.json").read_text())["trust"]
    assert trust == meta["trust"] and trust["val_images"] == 49 * 1
    assert meta["model"]["temperature"] == pytest.approx(trust["temperature"]) and trust["temperature"] > 0
    assert 0.0 <= trust["confidence_threshold"] <= 1.0 and metrics["val_temperature"] == trust["temperature"]
    from pipeline.contract import onnx_session

    example = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28)).astype(np.float32)
    (onnx_logits,) = onnx_session(models / "model.onnx").run(["logits"], {"images": example})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits, model(torch.from_numpy(example)).numpy(), atol=1e-4)

    run_info = json.loads((models / "train_run.json").read_text())
    assert run_info["run_id"] == result["run_id"]
    client = mlflow.MlflowClient(run_info["tracking_uri"])
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    # How many feedback items the training split held (none here), what the retrain deployment reads back.
    assert (run.data.params["data.feedback_items"], run.data.params["data.feedback_max_id"]) == ("0", "0")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_balanced_accuracy")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "refit_train_loss")] == [1, 2]
    assert "refit_val_balanced_accuracy" not in run.data.metrics  # the refit has nothing held out
    assert run.data.metrics["val_temperature"] == pytest.approx(trust["temperature"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reports", "figures"} <= artifacts
    # MLflow 3 keeps models as LoggedModels linked to the run, not as run artifacts: the served ONNX export
    # (the one the registry registers, result["model_uri"]) and the PyTorch model.
    assert result["model_uri"].startswith("models:/")
    logged = mlflow.get_logged_model(result["model_uri"].removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id and logged.name == "onnx"
    names = {m.name for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
             if m.source_run_id == run.info.run_id}
    assert names == {"onnx", "model"}
    assert run.info.run_name.startswith("train · ") and run.data.tags["mlflow.source.name"] == "train"
    # A finished stage leaves no checkpoint behind: the next run trains afresh.
    assert not (settings.path("checkpoints") / training.CHECKPOINT_FILE).exists()
    assert not (settings.path("checkpoints") / training.REFIT_CHECKPOINT_FILE).exists()


def test_small_data_gets_a_smaller_batch_and_proportional_lr(make_settings):
    cfg = make_settings({"train.batch_size": 256, "train.lr": 0.1, "train.min_steps_per_epoch": 64,
                         "train.min_batch_size": 32, "train.epochs": 12, "train.warmup_fraction": 0.1}).train
    large = plan_steps(cfg, n_train=209_000)  # K49's train split
    assert (large.batch_size, large.lr, large.steps_per_epoch) == (256, 0.1, 816)
    small = plan_steps(cfg, n_train=5_410)  # kmnist-dev's train split
    assert (small.batch_size, small.steps_per_epoch) == (64, 84)
    assert small.lr == pytest.approx(0.025)
    assert small.total_steps == 12 * 84 and small.warmup_steps == round(0.1 * 12 * 84)
    tiny_data = plan_steps(cfg, n_train=500)  # halving stops at min_batch_size
    assert tiny_data.batch_size == 32 and tiny_data.lr == pytest.approx(0.0125)


def _distance(a: nn.Module, b: nn.Module) -> float:
    return math.sqrt(sum(float((p.detach() - q.detach()).pow(2).sum()) for p, q in zip(a.parameters(), b.parameters())))


def test_weight_average_tracks_the_trained_model_from_the_first_steps():
    """A fixed 0.999 average of a 60-step run is still the initial weights; the warmed-up one is not."""
    torch.manual_seed(0)
    model = SpinalVGG(NUM_CLASSES, spinal_width=16, dropout=0.0, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    initial = SpinalVGG(**model.config())
    initial.load_state_dict(model.state_dict())
    warmed = make_weight_average(model, max_decay=0.999)
    fixed = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003)
    x, y = torch.from_numpy(TRAIN.images).float().unsqueeze(1), torch.from_numpy(TRAIN.labels)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmed.update_parameters(model)
        fixed.update_parameters(model)
    travelled = _distance(model, initial)
    assert travelled > 0
    assert _distance(fixed.module, model) > 0.75 * travelled  # the old average: still near the start
    assert _distance(warmed.module, model) < 0.25 * travelled  # the warmed-up one: near the live weights
    model.eval(), warmed.module.eval()
    with torch.no_grad():
        agree = (warmed.module(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agree > 0.9


def test_weight_average_decay_warms_up_to_its_cap():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(0.91)
    assert ema_decay_at(50_000, 0.999) == 0.999


def test_tuned_values_overlay_the_profile_but_not_the_command_line(tmp_path):
    from pipeline.config import ConfigError, load_settings, write_params
    from pipeline.contract import BEST_PARAMS_FILE, DataError

    settings = load_settings(write_params(tmp_path / "params.yaml", {"profile": "quick"}))
    assert training.apply_tuned(settings) is settings  # no file: params.yaml as it is
    best = settings.path("models") / BEST_PARAMS_FILE
    best.parent.mkdir(parents=True)
    best.write_text("{}\n")
    assert training.apply_tuned(settings) is settings  # tuning was off
    best.write_text("train.lr: 0.0123\nmodel.dropout: 0.25\n")
    tuned = training.apply_tuned(settings)
    assert (tuned.train.lr, tuned.model.dropout) == (0.0123, 0.25)  # tuned > profile
    assert tuned.train.epochs == settings.train.epochs

    pinned = load_settings(write_params(tmp_path / "params.yaml", {"profile": "quick", "train.lr": 0.07}))
    both = training.apply_tuned(pinned)
    assert (both.train.lr, both.model.dropout) == (0.07, 0.25)  # command line > tuned

    best.write_text("train.nope: 1\n")
    with pytest.raises(ConfigError, match="train.nope"):
        training.apply_tuned(settings)
    best.write_text("train.lr: [unclosed\n")
    with pytest.raises(DataError, match="not valid YAML"):
        training.apply_tuned(settings)


def test_each_epoch_line_says_how_long_the_rest_of_the_run_takes():
    done = [EpochMetrics(1, 1.0, None, None, None, 0.1, 100.0), EpochMetrics(2, 0.9, None, None, None, 0.1, 140.0)]
    assert loop._time_left(done, 12) == ", ~20 min left (10 epochs)"  # 10 x the 120 s mean
    assert loop._time_left(done, 3) == ", ~2 min left (1 epoch)"
    assert loop._time_left(done, 2) == ""
