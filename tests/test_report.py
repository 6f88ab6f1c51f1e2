"""`--report`: training runs reported through transformers' own tracker integrations, offline:
W&B offline mode, an MLflow file store. What the trackers got equals trainer_log.jsonl, and the
run config holds the lmforge.json parameters."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from conftest import bad, ok, shared_path

STORIES = "models/stories260K"
needs = {name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} not installed "
                                  f"(pip install 'lmforge[{name}]')") for name in ("wandb", "mlflow", "trackio")}


def test_report_names_and_unknown_trackers():
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train.reporting import flat, names

    assert names(None) == [] and names(["none"]) == [] and names("none") == []
    assert names(["wandb,mlflow", "none", "wandb", "TensorBoard"]) == ["wandb", "mlflow", "tensorboard"]
    with pytest.raises(BadInput, match="comet"):
        names(["comet"])
    assert flat({"a": {"b": 1, "c": {"d": [1, 2]}}}) == {"a.b": 1, "a.c.d": "[1, 2]"}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    import demo

    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("report")
    demo.write(work / "raw", rows=40)
    ok(["data", "align", work / "raw" / "tasks.jsonl", "-o", work / "a.arrow"])
    ok(["data", "pack", work / "a.arrow", "-m", base, "-t", "default", "--cutoff", "96", "-o", work / "p.arrow"])
    return {"base": base, "data": work / "p.arrow"}


@pytest.mark.parametrize("tracker", ["swanlab", "trackio", "wandb", "mlflow"])
def test_missing_tracker_package_names_the_extra(packed, tmp_path, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    line = bad(["train", "sft", "-m", packed["base"], "-d", packed["data"], "-o", tmp_path / "o", "--report", tracker])
    assert f"lmforge[{tracker}]" in line
    assert not (tmp_path / "o").exists()


def _wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


@pytest.mark.slow
@needs["wandb"]
@needs["mlflow"]
def test_wandb_offline_and_mlflow_file_store_get_the_trainer_log(packed, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 reads a plain directory store only so

    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    ok(["train", "sft", "-m", packed["base"], "-d", packed["data"], "-o", out, "--max-steps", "3",
        "--logging-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--report", "wandb", "--report", "mlflow"],
       env=env, fresh=True)
    journal = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in journal if "loss" in e}
    assert sorted(losses) == [1, 2, 3]
    record = json.loads((out / "lmforge.json").read_text())

    # MLflow: metric history per step, params named lmforge.*
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_name == "run"
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert history == pytest.approx(losses, rel=1e-6)
    params = runs[0].data.params
    assert float(params["lmforge.hyperparameters.learning_rate"]) == record["hyperparameters"]["learning_rate"]
    assert params["lmforge.method"] == record["method"] and params["lmforge.stage"] == "sft"

    # W&B offline run file: history rows and the config
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged, config = {}, {}
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in row:
                logged[row["train/global_step"]] = row["train/loss"]
        elif kind == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.config.update})
    assert logged == pytest.approx(losses, rel=1e-6)
    assert config["lmforge"]["hyperparameters"] == json.loads(json.dumps(record["hyperparameters"]))
    assert config["lmforge"]["method_options"]["lora_rank"] == record["method_options"]["lora_rank"]


@needs["mlflow"]
def test_loop_reporter_drives_the_integrations(tmp_path, monkeypatch):
    """What `train ppo` (its own loop) uses: the same integration callbacks, driven step by step."""
    from lmforge.shared.train.reporting import LoopReporter
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    reporter = LoopReporter(["mlflow", "tensorboard"], tmp_path / "ppo-run",
                            {"stage": "ppo", "hyperparameters": {"kl_coef": 0.05}})
    reporter.begin(max_steps=2)
    entries = [{"reward": 0.5, "kl": 0.01}, {"reward": 0.75, "kl": 0.02}]
    for step, entry in enumerate(entries, 1):
        reporter.log(step, entry)
    reporter.end()
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "reward")} == {1: 0.5, 2: 0.75}
    assert run.data.params["lmforge.hyperparameters.kl_coef"] == "0.05" and run.info.run_name == "ppo-run"
    assert list((tmp_path / "ppo-run" / "tensorboard").glob("events.out.tfevents.*"))   # as train sft writes it


@pytest.mark.slow
@needs["trackio"]
def test_trackio_local_store_gets_the_trainer_log(packed, tmp_path):
    """Trackio, local (TRACKIO_DIR: a SQLite file per project, nothing uploaded): the logged losses
    per step equal trainer_log.jsonl, and the run config carries the lmforge parameters."""
    import sqlite3

    out = tmp_path / "run"
    ok(["train", "sft", "-m", packed["base"], "-d", packed["data"], "-o", out, "--max-steps", "3",
        "--logging-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--report", "trackio"],
       env={"TRACKIO_DIR": str(tmp_path / "trackio")}, fresh=True)
    journal = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in journal if "loss" in e}
    record = json.loads((out / "lmforge.json").read_text())
    stores = list((tmp_path / "trackio").glob("*.db"))
    assert len(stores) == 1
    with sqlite3.connect(stores[0]) as db:
        rows = [(name, json.loads(metrics)) for name, metrics in db.execute("select run_name, metrics from metrics")]
        configs = [json.loads(c) for name, c in db.execute("select run_name, config from configs")]
    logged = {m["train/global_step"]: m["train/loss"] for name, m in rows if "train/loss" in m and name == "run"}
    assert logged == pytest.approx(losses, rel=1e-6)
    assert len(configs) == 1 and configs[0]["lmforge.method"] == record["method"]
    assert configs[0]["lmforge.hyperparameters.learning_rate"] == record["hyperparameters"]["learning_rate"]
