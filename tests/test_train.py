"""The training loop: outputs, resuming after kill -9, the NaN guard, DDP, option checking."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import intr.train
from intr.cli import main as intr_main
from intr.data.images import ImageSet, read_split
from intr.models.backbones import BackboneSpec, normalization
from intr.models.prompt_cam import PromptCAM
from intr.models import CheckpointError, load_model
from intr.train import TrainingDiverged, TrainOptions, predict, train

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = BackboneSpec(name="vit_tiny_patch16_224",
                    kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4})
MODEL = {"backbone": TINY.to_dict()}
TRAIN = {"epochs": 2, "batch_size": 8, "lr": 0.05, "warmup_epochs": 1, "seed": 3}
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "val_acc", "lr", "seconds"]




@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> tuple[Path, Path]:
    """(manifest path, data set root) of 4 synthetic species, 32 px (tests/conftest.py)."""
    return tiny_dataset


def child_env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def write_config(path: Path, image_size: int, backbone: BackboneSpec, train_options: dict) -> Path:
    section = {"image_size": image_size, "model": {"backbone": backbone.to_dict()}, "train": train_options}
    path.write_text(yaml.safe_dump({"prompt_cam": section}))
    return path


def cli_train(config: Path, dataset: tuple[Path, Path], out: Path) -> list[str]:
    manifest, root = dataset
    return ["-m", "intr.cli", "train", "--method", "prompt_cam", "--config", str(config),
            "--manifest", str(manifest), "--root", str(root), "--out", str(out), "--quiet", "--threads", "1"]


def read_log(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "train_log.parquet")


def load(path: Path) -> dict:
    # Read with torch itself, not the project's loader: what the files hold is checked independently.
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- outputs


def test_training_writes_loadable_model_and_one_log_row_per_epoch(dataset, tmp_path, monkeypatch) -> None:
    built = []

    def build_and_keep(*args):
        built.append(build(*args))
        return built[-1]

    build = intr.train.build_model
    monkeypatch.setattr(intr.train, "build_model", build_and_keep)
    manifest, root = dataset
    summary = train("prompt_cam", MODEL, TRAIN | {"epochs": 3}, manifest, root, tmp_path, 32, progress=False)
    trained = built[0]  # the very model the loop trained (frozen backbone included)
    log = read_log(tmp_path)
    assert list(log.columns) == LOG_COLUMNS
    assert log["epoch"].tolist() == [1, 2, 3]
    assert log[["train_loss", "train_acc", "val_acc", "lr", "seconds"]].notna().all().all()
    assert log["lr"].iloc[0] == pytest.approx(0.05)  # end of warm-up: the peak rate
    best = int(log["val_acc"].idxmax()) + 1  # the first epoch with the best accuracy
    assert summary["best_epoch"] == best and summary["finished"]

    saved = load(tmp_path / "model.pt")  # weights_only
    assert set(saved["state"]) == {"class_prompts", "presence_head.weight", "presence_head.bias"}
    assert saved["epoch"] == best
    assert json.loads(saved["config"])["num_classes"] == 4
    # Both files name the manifest's classes in class_id order, with the sha256 of that list.
    names = pd.read_parquet(manifest).drop_duplicates("class_id").sort_values("class_id")["class_name"].tolist()
    for checkpoint in (saved, load(tmp_path / "checkpoints" / "last.pt")):
        assert checkpoint["class_names"] == names
        assert checkpoint["class_fingerprint"] == hashlib.sha256(json.dumps(names).encode()).hexdigest()
    assert load(tmp_path / "checkpoints" / "last.prev.pt")["epoch"] == 2  # the fallback of a damaged last.pt

    model, config = load_model(tmp_path / "model.pt")
    assert isinstance(model, PromptCAM) and not model.training
    assert config["image_size"] == 32 and config["method"] == "prompt_cam"
    trained.load_state_dict(saved["state"], strict=False)
    val = ImageSet(root, read_split(manifest, "val"), 32, *normalization(model.backbone))
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained.eval()(images), rtol=0, atol=0)
    accuracy = float((predict(model, val, torch.device("cpu")).argmax(1) == val.labels).float().mean())
    assert accuracy == log["val_acc"].iloc[best - 1]


# --------------------------------------------------------------------------- resuming


def test_resume_after_kill_9_matches_uninterrupted_run(dataset, tmp_path) -> None:
    # 64 px inputs (4 px patches, 256 tokens) make an epoch long enough to be killed in.
    backbone = BackboneSpec(name="vit_tiny_patch16_224",
                            kwargs={"img_size": 64, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 4})
    options = TRAIN | {"epochs": 4, "optimizer": "sgd", "momentum": 0.9}
    config = write_config(tmp_path / "config.yaml", 64, backbone, options)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = dict(cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    victim = subprocess.Popen([sys.executable, *cli_train(config, dataset, resumed)], **kw)
    checkpoint = resumed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    killed_after = load(checkpoint)["epoch"]
    assert 1 <= killed_after < options["epochs"]
    assert not (resumed / "model.pt").exists()

    again = subprocess.Popen([sys.executable, *cli_train(config, dataset, resumed)], **kw)
    # The uninterrupted run, in this process (one thread, like the CLI's --threads 1) meanwhile.
    manifest, root = dataset
    train("prompt_cam", {"backbone": backbone.to_dict()}, options, manifest, root, straight, 64, progress=False)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert f"resuming prompt_cam from {checkpoint} after epoch {killed_after}" in output

    columns = ["epoch", "train_loss", "train_acc", "val_acc", "lr"]
    pd.testing.assert_frame_equal(read_log(resumed)[columns], read_log(straight)[columns], check_exact=True)
    for name in ("model.pt", "checkpoints/last.pt"):
        a, b = load(resumed / name), load(straight / name)
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (name, key)
    momentum = [load(d / "checkpoints/last.pt")["optimizer"]["state"] for d in (resumed, straight)]
    for key in momentum[0]:
        assert torch.equal(momentum[0][key]["momentum_buffer"], momentum[1][key]["momentum_buffer"])


def truncate(path: Path) -> None:
    """Keep the first half of ``path``'s bytes, as a full disk or an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_damaged_last_pt_falls_back_to_last_prev_pt_and_matches_an_uninterrupted_run(dataset, tmp_path) -> None:
    manifest, root = dataset
    options = TRAIN | {"epochs": 3}
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    train("prompt_cam", MODEL, options, manifest, root, resumed, 32, progress=False, stop_after_epochs=2)
    checkpoints = resumed / "checkpoints"
    assert load(checkpoints / "last.pt")["epoch"] == 2 and load(checkpoints / "last.prev.pt")["epoch"] == 1
    truncate(checkpoints / "last.pt")
    with pytest.warns(UserWarning, match=r"last\.pt is truncated .*; resuming from the previous checkpoint "
                      r".*last\.prev\.pt \(epoch 1\); the damaged file is kept as last-damaged\.pt"):
        summary = train("prompt_cam", MODEL, options, manifest, root, resumed, 32, progress=False)
    assert summary["finished"] and read_log(resumed)["epoch"].tolist() == [1, 2, 3]
    assert load(checkpoints / "last.pt")["epoch"] == 3 and load(checkpoints / "last.prev.pt")["epoch"] == 2

    train("prompt_cam", MODEL, options, manifest, root, straight, 32, progress=False)
    columns = ["epoch", "train_loss", "train_acc", "val_acc", "lr"]
    pd.testing.assert_frame_equal(read_log(resumed)[columns], read_log(straight)[columns], check_exact=True)
    a, b = load(resumed / "model.pt")["state"], load(straight / "model.pt")["state"]
    assert all(torch.equal(a[key], b[key]) for key in b)


def test_unreadable_last_and_previous_checkpoints_say_what_to_delete(dataset, tmp_path, capsys) -> None:
    manifest, root = dataset
    train("prompt_cam", MODEL, TRAIN | {"epochs": 3}, manifest, root, tmp_path, 32, progress=False,
          stop_after_epochs=2)
    last, previous = tmp_path / "checkpoints" / "last.pt", tmp_path / "checkpoints" / "last.prev.pt"
    truncate(last)
    previous.write_bytes(b"")
    with pytest.raises(CheckpointError) as refused:
        train("prompt_cam", MODEL, TRAIN | {"epochs": 3}, manifest, root, tmp_path, 32, progress=False)
    message = str(refused.value)
    assert message.startswith(f"cannot resume training: {last} is truncated")
    assert f"{previous} is empty (0 bytes)" in message
    assert message.endswith(f"To start over, delete {last} and {previous}")
    # The command line prints the same as one line, without a traceback.
    config = write_config(tmp_path / "config.yaml", 32, TINY, TRAIN | {"epochs": 3})
    assert intr_main(cli_train(config, dataset, tmp_path)[2:]) == 1
    assert capsys.readouterr().err == f"intr train: error: {message}\n"


def test_checkpoint_of_other_classes_starts_over_and_is_kept(dataset, tmp_path, capsys) -> None:
    manifest, root = dataset
    train("prompt_cam", MODEL, TRAIN | {"epochs": 1}, manifest, root, tmp_path / "run", 32, progress=False)
    old = load(tmp_path / "run" / "checkpoints" / "last.pt")
    renamed = pd.read_parquet(manifest)
    renamed.loc[renamed["class_id"] == 1, "class_name"] = "renamed_species"  # same count, same config digest
    renamed.to_parquet(tmp_path / "renamed.parquet", index=False)
    train("prompt_cam", MODEL, TRAIN | {"epochs": 1}, tmp_path / "renamed.parquet", root, tmp_path / "run", 32,
          progress=False)
    assert "last.pt was written for other classes; starting over" in capsys.readouterr().out
    assert load(tmp_path / "run" / "model.pt")["class_names"][1] == "renamed_species"
    assert load(tmp_path / "run" / "checkpoints" / f"last-superseded-{old['digest']}.pt")["class_names"][1] != \
        "renamed_species"


# --------------------------------------------------------------------------- NaN guard


def test_diverging_loss_stops_with_epoch_and_keeps_last_good_checkpoint(dataset, tmp_path) -> None:
    manifest, root = dataset
    train_images = len(read_split(manifest, "train"))
    # One step per epoch and no warm-up: epoch 1's loss is computed before the
    # absurd step, epoch 2 then runs on weights of size ~1e30 and turns NaN.
    options = TRAIN | {"epochs": 3, "batch_size": train_images, "lr": 1e30, "warmup_epochs": 0}
    for _ in range(2):  # rerunning resumes from the good epoch and diverges the same way
        with pytest.raises(TrainingDiverged, match=r"at epoch 2, step 1.*last\.pt \(epoch 1\)"):
            train("prompt_cam", MODEL, options, manifest, root, tmp_path, 32, progress=False)
        saved = load(tmp_path / "checkpoints" / "last.pt")
        assert saved["epoch"] == 1
        assert [row["epoch"] for row in json.loads(saved["log"])] == [1]
        assert all(torch.isfinite(v).all() for v in saved["state"].values())
        assert not (tmp_path / "model.pt").exists() and not (tmp_path / "train_log.parquet").exists()


def test_diverging_in_first_epoch_writes_nothing(dataset, tmp_path) -> None:
    manifest, root = dataset
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 2.*none yet"):
        train("prompt_cam", MODEL, TRAIN | {"lr": 1e30, "warmup_epochs": 0}, manifest, root, tmp_path, 32,
              progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(dataset, tmp_path) -> None:
    manifest, root = dataset
    config = write_config(tmp_path / "config.yaml", 32, TINY, TRAIN)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    ddp = subprocess.run([*launch, *cli_train(config, dataset, tmp_path / "ddp")], cwd=REPO_ROOT, env=child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout
    train("prompt_cam", MODEL, TRAIN, manifest, root, tmp_path / "single", 32, progress=False)

    a, b = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert a["epoch"].tolist() == b["epoch"].tolist() == [1, 2]
    for column in ("train_loss", "train_acc", "val_acc", "lr"):
        assert a[column].tolist() == pytest.approx(b[column].tolist(), abs=1e-5), column
    for name in ("model.pt", "checkpoints/last.pt"):
        sa, sb = load(tmp_path / "ddp" / name)["state"], load(tmp_path / "single" / name)["state"]
        assert set(sa) == set(sb)
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-5)
    # Training moved the weights, so agreeing means something.
    first = load(tmp_path / "single" / "checkpoints/last.pt")["state"]["class_prompts"]
    torch.manual_seed(TRAIN["seed"])
    initial = intr.train.build_model("prompt_cam", MODEL, 4, 32).class_prompts
    assert (first - initial).abs().max() > 1e-3


# --------------------------------------------------------------------------- options


def test_unknown_train_option_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        TrainOptions.from_dict({"epochs": 2, "learning_rate": 0.1})
    assert TrainOptions.from_dict({"epochs": 2, "lr": 0.1}).lr == 0.1


def test_data_loading_workers_do_not_change_the_run(dataset, tmp_path) -> None:
    manifest, root = dataset
    train("prompt_cam", MODEL, TRAIN | {"epochs": 1, "workers": 0}, manifest, root, tmp_path / "w0", 32,
          progress=False)
    train("prompt_cam", MODEL, TRAIN | {"epochs": 1, "workers": 2}, manifest, root, tmp_path / "w2", 32,
          progress=False)
    a, b = read_log(tmp_path / "w0"), read_log(tmp_path / "w2")
    assert a[["train_loss", "train_acc", "val_acc"]].equals(b[["train_loss", "train_acc", "val_acc"]])
    sa, sb = load(tmp_path / "w0" / "model.pt")["state"], load(tmp_path / "w2" / "model.pt")["state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_changed_config_starts_over_and_keeps_the_old_checkpoint(dataset, tmp_path, capsys) -> None:
    manifest, root = dataset
    train("prompt_cam", MODEL, TRAIN | {"epochs": 1}, manifest, root, tmp_path, 32, progress=False)
    old = load(tmp_path / "checkpoints" / "last.pt")
    summary = train("prompt_cam", MODEL, TRAIN | {"epochs": 2, "lr": 0.01}, manifest, root, tmp_path, 32,
                    progress=False)
    assert "starting over" in capsys.readouterr().out
    assert summary["epochs"] == 2 and read_log(tmp_path)["epoch"].tolist() == [1, 2]
    kept = tmp_path / "checkpoints" / f"last-superseded-{old['digest']}.pt"
    assert kept.exists() and load(kept)["epoch"] == 1
