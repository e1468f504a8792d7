"""Values from `self.log` reach TensorBoard per batch and per epoch, beside the
loss and metrics: read back with TensorBoard's own reader and served by the
real `tensorboard` server."""

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import customfit
from tests import models

BATCHES, EPOCHS = 4, 2


class Logged(customfit.CustomModel):
    def transform_gradients(self, gradients, variables):
        self.log("grad_norm", tf.linalg.global_norm(gradients))
        return gradients


class BatchLogs(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.values.append({k: float(v) for k, v in logs.items()})

    def on_train_begin(self, logs=None):
        self.values = []


def train_with_tensorboard(digits, logdir):
    model = models.mlp(Logged)
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    batch_logs = BatchLogs()
    x, y = digits[0][: 32 * BATCHES], digits[1][: 32 * BATCHES]
    history = model.fit(
        x, y, batch_size=32, epochs=EPOCHS, verbose=0,
        validation_data=(digits[0][-64:], digits[1][-64:]),
        callbacks=[keras.callbacks.TensorBoard(logdir, update_freq=1), batch_logs])
    return history.history, batch_logs.values


def scalars(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def test_logged_values_are_written_per_batch_and_per_epoch(digits, tmp_path):
    history, batch_logs = train_with_tensorboard(digits, tmp_path)
    train = scalars(tmp_path / "train")

    for name in ("loss", "accuracy", "grad_norm"):
        assert [v for _, v in train[f"epoch_{name}"]] == [
            float(np.float32(h)) for h in history[name]], name
        written = train[f"batch_{name}"]
        assert [step for step, _ in written] == list(range(1, EPOCHS * BATCHES + 1))
        assert [v for _, v in written] == [
            float(np.float32(logs[name])) for logs in batch_logs], name
    validation = scalars(tmp_path / "validation")
    assert [v for _, v in validation["epoch_loss"]] == [
        float(np.float32(h)) for h in history["val_loss"]]


def served_at(log_path, server, deadline):
    """The address TensorBoard printed once it listened (on the port the
    system gave it: `--port 0`, so that no other process can take it first)."""
    while True:
        found = re.search(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+)/", log_path.read_text())
        if found:
            return found.group(1)
        assert server.poll() is None, log_path.read_text()[-2000:]
        assert time.monotonic() < deadline, "TensorBoard did not start in time"
        time.sleep(0.5)


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tensorboard_server_serves_the_logged_scalar(digits, tmp_path):
    history, _ = train_with_tensorboard(digits, tmp_path / "logs")
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"),
             "--host", "127.0.0.1", "--port", "0", "--load_fast", "false",
             "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline, tags = time.monotonic() + 90, {}
        base = f"{served_at(tmp_path / 'server.log', server, deadline)}/data/plugin/scalars"
        while "epoch_grad_norm" not in tags.get("train", {}):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"no tag served in time: {tags}"
            try:
                tags = get_json(f"{base}/tags")
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert "batch_grad_norm" in tags["train"]
        assert "epoch_loss" in tags["train"] and "epoch_loss" in tags["validation"]
        query = urllib.parse.urlencode({"run": "train", "tag": "epoch_grad_norm"})
        served = get_json(f"{base}/scalars?{query}")  # [[wall_time, step, value], ...]
        assert [step for _, step, _ in served] == list(range(EPOCHS))
        assert [value for _, _, value in served] == [
            float(np.float32(h)) for h in history["grad_norm"]]
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
