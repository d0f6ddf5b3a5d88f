"""`dpspeed train`: train a model under DP end to end, with a progress bar, and report accuracy and epsilon."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, TensorDataset

from . import data, models
from ..engine import PrivacyEngine
from .options import TrainConfig, parse_style



@dataclass
class TrainResult:
    test_accuracy: float
    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def accuracy(model: torch.nn.Module, dataset: TensorDataset, device: str, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch):
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    model.train()
    return correct / len(dataset)


def check(config: TrainConfig, examples: int) -> None:
    """The mistakes found before anything is built, each with what to do."""
    if (config.epsilon is None) == (config.sigma is None):
        raise ValueError("give exactly one of a target epsilon or a noise multiplier sigma")
    if config.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {config.epochs}")
    if not 0 < config.delta < 1 / examples:
        raise ValueError(f"--delta must be in (0, 1/N) = (0, {1 / examples:.2g}) for N = {examples} training "
                         f"examples (a delta of 1/N or more allows publishing one example outright); got {config.delta:g}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: there is no CUDA device here; use --device cpu")
    if models.is_text(config.model):
        raise ValueError(f"--model {config.model}: hf: models take token ids, and dpspeed train's data sets are "
                         "images; use timm:NAME or your own py:FILE.py:FUNCTION (hf: models work in dpspeed bench)")


def _fits(model: torch.nn.Module, sample: torch.Tensor, name: str) -> None:
    """The model takes the data's inputs: said before training, not as an error deep inside it."""
    try:
        with torch.no_grad():
            model.eval()(sample[None])
    except Exception as err:  # noqa: BLE001 -- whatever the model raises, the cause is the input size
        raise ValueError(f"--model {name} cannot take this data's inputs of shape {tuple(sample.shape)}: "
                         f"{str(err).splitlines()[0]}") from err
    model.train()


def _saved_run(config: TrainConfig) -> tuple[TrainConfig, dict | None]:
    """With `resume`: the saved run's options (its folder as `out` unless another is given) and
    its checkpoint."""
    if config.resume is None:
        return config, None
    path = Path(config.resume) / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"--resume {config.resume}: no checkpoint.pt there (dpspeed train --out DIR writes one "
                         "after every epoch)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    options = {**saved["extra"]["config"], "resume": config.resume, "out": config.out or config.resume}
    return TrainConfig(**options), saved["extra"]


def train(config: TrainConfig, show_progress: bool = True) -> TrainResult:
    """Train `config.model` on `config.data` with DP-SGD (momentum 0.9); return test accuracy and
    epsilon. With `resume`, continue the run saved in that folder to the epochs it was started with:
    its model, optimizer, accountant and noise multiplier (a `--reproducible` run's batches and
    noise too)."""
    config, saved = _saved_run(config)
    torch.manual_seed(config.seed)
    train_set, test_set, classes = data.load(config.data, config.data_dir, config.seed)
    check(config, len(train_set))
    sample = train_set[0][0]
    model = models.build(config.model, sample.shape[0], sample.shape[-1], classes).to(config.device)
    _fits(model, sample.to(config.device), config.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    loader = DataLoader(train_set, batch_size=config.batch_size)
    engine = PrivacyEngine(accountant=config.accountant)
    options = dict(
        module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=config.max_grad_norm,
        clipping_mode=config.clipping_mode, clipping_style=parse_style(config.clipping_style),
        clipping_fn=config.clipping_fn, max_physical_batch_size=config.physical_batch_size,
        seed=config.seed if config.reproducible else None,
        # every mode through the criterion make_private returns (ghost and mix-ghost need it)
        criterion=torch.nn.CrossEntropyLoss(),
    )
    if saved is not None:  # the noise the run was calibrated to, not a new calibration
        model, optimizer, criterion, loader = engine.make_private(noise_multiplier=saved["noise_multiplier"], **options)
        engine.load_checkpoint(Path(config.resume) / "checkpoint.pt", model, optimizer)
    elif config.epsilon is not None:
        model, optimizer, criterion, loader = engine.make_private_with_epsilon(
            target_epsilon=config.epsilon, target_delta=config.delta, epochs=config.epochs, **options
        )
    else:
        model, optimizer, criterion, loader = engine.make_private(noise_multiplier=config.sigma, **options)

    history: list[dict] = list(saved["history"]) if saved else []
    first_epoch = len(history) + 1
    if first_epoch > config.epochs:
        raise ValueError(f"--resume {config.resume}: that run has trained all its {config.epochs} epochs")
    start = time.perf_counter()
    columns = [TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("train loss {task.fields[loss]:.3f}  train acc {task.fields[train_acc]:.3f}  "
                          "test acc {task.fields[test_acc]}  ε {task.fields[eps]:.2f}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("train", total=config.epochs * len(loader), completed=(first_epoch - 1) * len(loader),
                                 epoch=first_epoch, loss=float("nan"), train_acc=0.0, test_acc="-", eps=0.0)
        for epoch in range(first_epoch, config.epochs + 1):
            total_loss, correct, seen = 0.0, 0, 0
            for x, y in loader:
                x, y = x.to(config.device), y.to(config.device)
                if len(x):  # a Poisson batch can be empty: its step adds noise only
                    logits = model(x)
                    loss = criterion(logits, y)
                    loss.backward()
                    total_loss, seen = total_loss + float(loss.detach()) * len(x), seen + len(x)
                    correct += int((logits.detach().argmax(1) == y).sum())
                optimizer.step()
                optimizer.zero_grad()
                if optimizer.is_last_physical_batch:  # epsilon after every logical step (milliseconds)
                    progress.update(task, advance=1, epoch=epoch, loss=total_loss / max(seen, 1),
                                    train_acc=correct / max(seen, 1), eps=engine.get_epsilon(config.delta))
            eps = engine.get_epsilon(config.delta)
            acc = accuracy(model, test_set, config.device)
            history.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                            "test_accuracy": acc, "epsilon": eps})
            progress.update(task, test_acc=f"{acc:.3f}", eps=eps)
            if config.out:  # after every epoch: a run stopped here resumes with --resume
                Path(config.out).mkdir(parents=True, exist_ok=True)
                engine.save_checkpoint(Path(config.out) / "checkpoint.pt", model, optimizer, config=asdict(config),
                                       history=history, noise_multiplier=optimizer.noise_multiplier)

    result = TrainResult(
        test_accuracy=history[-1]["test_accuracy"], epsilon=history[-1]["epsilon"], delta=config.delta,
        noise_multiplier=engine.noise_multiplier, steps=optimizer.logical_steps,
        seconds=time.perf_counter() - start, history=history,
    )
    if config.out:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"config": asdict(config), **asdict(result)}, indent=2))
    engine.detach()
    return result
