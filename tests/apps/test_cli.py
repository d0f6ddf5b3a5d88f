"""`dpspeed train`: the whole job on real data (scikit-learn's digits), and CIFAR read from pickles."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from dpspeed.apps import cli, data
from dpspeed.apps.train import TrainConfig, train


def test_train_default_job_reaches_target_accuracy(tmp_path):
    """The default job: digits, small CNN, epsilon = 8; the issue's target is accuracy >= 0.90
    (with the batches and the noise seeded, so that the check does not depend on a random draw)."""
    result = train(TrainConfig(out=str(tmp_path), reproducible=True), show_progress=False)
    assert result.epsilon <= 8.0 + 1e-6
    assert result.test_accuracy >= 0.90
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] == result.test_accuracy and len(metrics["history"]) == TrainConfig().epochs
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["engine"]["accountant"]["history"] and checkpoint["optimizer"]["dpspeed"]


def test_train_seeds_the_noise_only_when_asked(monkeypatch):
    from dpspeed import PrivacyEngine

    seeds = []

    def stop(self, **options):
        seeds.append(options["seed"])
        raise KeyboardInterrupt

    monkeypatch.setattr(PrivacyEngine, "make_private", stop)
    for reproducible in (False, True):
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(sigma=1.0, epsilon=None, seed=3, reproducible=reproducible), show_progress=False)
    assert seeds == [None, 3]


def test_cli_runs_with_options_and_reports(capsys):
    code = cli.main(["train", "--epochs", "1", "--sigma", "1.0", "--clipping-mode", "bk", "--clipping-style", "layer-wise",
                     "--physical-batch-size", "32", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "ε" in out


def test_cli_reports_bad_input_clearly(capsys):
    assert cli.main(["train", "--clipping-mode", "magic", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "clipping_mode" in err and err.count("\n") == 1 and "Traceback" not in err


def _write_cifar(folder, files, key, classes, n=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in files:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         key: rng.integers(0, classes, n).tolist()}, f)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_are_read_from_disk(tmp_path, name):
    folder, train_files, test_files, key, classes = data.CIFAR[name]
    _write_cifar(tmp_path / folder, train_files + test_files, key, classes)
    train_set, test_set, k = data.load(name, str(tmp_path))
    assert k == classes and len(train_set) == 20 * len(train_files) and len(test_set) == 20
    assert train_set[0][0].shape == (3, 32, 32)
    result = train(TrainConfig(data=name, data_dir=str(tmp_path), epochs=1, batch_size=10, sigma=1.0, epsilon=None),
                   show_progress=False)
    assert 0.0 <= result.test_accuracy <= 1.0


def test_missing_cifar_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "data_batch_1" in capsys.readouterr().err


def test_epsilon_command_gives_epsilon_or_the_noise_for_a_target(capsys):
    from dpspeed.accounting import epsilon_at

    assert cli.main(["epsilon", "--sigma", "1.0", "--batch-size", "256", "--examples", "60000", "--epochs", "2"]) == 0
    steps = 2 * math.ceil(60000 / 256)  # as make_private counts them
    want = epsilon_at("pld", 1.0, 256 / 60000, steps, 1e-5)
    assert f"ε = {want:.4g}" in capsys.readouterr().out
    assert cli.main(["epsilon", "--target-epsilon", "3", "--sample-rate", "0.01", "--steps", "500", "--accountant",
                     "rdp"]) == 0
    sigma = float(capsys.readouterr().out.split("σ = ")[1].split()[0])
    assert epsilon_at("rdp", sigma * 1.001, 0.01, 500, 1e-5) <= 3.0 <= epsilon_at("rdp", sigma * 0.99, 0.01, 500, 1e-5)
    assert cli.main(["epsilon", "--sigma", "1.0", "--batch-size", "2", "--examples", "98", "--epochs", "1"]) == 0
    assert "49 steps" in capsys.readouterr().out  # ceil(98 / 2), as make_private counts them
    assert cli.main(["epsilon", "--sigma", "1.0", "--steps", "10"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("dpspeed ")


@pytest.mark.parametrize("argv,says", [
    pytest.param(["train", "--device", "cuda"], "there is no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["train", "--epochs", "0"], "--epochs must be at least 1"),
    (["train", "--delta", "0.5"], "--delta must be in (0, 1/N)"),
    (["train", "--model", "hf:bert"], "hf: models take token ids"),
    (["train", "--model", "timm:vit_tiny_patch16_224"], "cannot take this data's inputs of shape (1, 8, 8)"),
    (["train", "--model", "timm:resnet5"], "did you mean resnet50"),
    (["train", "--model", "py:no_such_file.py:build"], "no file no_such_file.py"),
    (["report", "a", "b", "c"], "one folder"),
])
def test_a_users_mistake_is_one_line_and_exit_code_2(capsys, argv, says):
    if "timm:" in " ".join(argv):
        pytest.importorskip("timm")
    assert cli.main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("mode", ["ghost", "mix-ghost"])
def test_the_two_pass_modes_run_from_the_command_line(mode, capsys):
    assert cli.main(["train", "--epochs", "1", "--clipping-mode", mode, "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_help_does_not_load_torch():
    """`dpspeed --help` and `dpspeed train --help` build only the chosen command: no torch import."""
    import subprocess
    import sys

    for argv in (["--help"], ["train", "--help"], ["epsilon", "--help"]):
        code = ("import sys; from dpspeed.apps import cli\n"
                f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
                "print('torch' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip().splitlines()[-1] == "False", (argv, done.stderr)


def test_train_resumes_a_run_from_its_folder(tmp_path, capsys):
    """A run stopped after epoch 1 of 2, resumed: epsilon and the step count continue, the noise
    multiplier is the one the run was calibrated to, and the finished run cannot be resumed again."""
    out = str(tmp_path / "run")
    assert cli.main(["train", "--epochs", "1", "--out", out, "--no-progress"]) == 0
    first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    config = first["extra"]["config"]
    config["epochs"] = 2  # as if it had been started for 2 epochs and stopped after the first
    torch.save(first, tmp_path / "run" / "checkpoint.pt")
    assert cli.main(["train", "--resume", out, "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["steps"] == 2 * first["engine"]["logical_steps"]
    assert metrics["noise_multiplier"] == pytest.approx(first["extra"]["noise_multiplier"])
    assert metrics["epsilon"] > metrics["history"][0]["epsilon"]
    capsys.readouterr()
    assert cli.main(["train", "--resume", out, "--no-progress"]) == 2
    assert "has trained all its 2 epochs" in capsys.readouterr().err
