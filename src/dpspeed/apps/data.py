"""Data sets for `dpspeed train`: scikit-learn's bundled digits, and CIFAR from its python pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset, int]:
    """8x8 handwritten digits (1797 images, shipped with scikit-learn), split 80/20, standardised."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ValueError(f"the digits data set comes with scikit-learn ({err}): pip install 'dpspeed[cli]'") from err

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return TensorDataset((x_train - mean) / std, y_train), TensorDataset((x_test - mean) / std, y_test), 10


def _read_cifar(files: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in files:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels)


def cifar(name: str, data_dir: str | Path) -> tuple[TensorDataset, TensorDataset, int]:
    """CIFAR-10/100 from the python version's pickle files under `data_dir` (no download)."""
    folder, train_files, test_files, label_key, classes = CIFAR[name]
    root = Path(data_dir)
    if (root / folder).is_dir():
        root = root / folder
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: {', '.join(missing)} not found in {root}; download the python version of {name.upper()} "
            f"and pass its folder ({folder}) or the folder holding it as --data-dir"
        )
    x_train, y_train = _read_cifar([root / f for f in train_files], label_key)
    x_test, y_test = _read_cifar([root / f for f in test_files], label_key)
    mean = x_train.float().mean((0, 2, 3), keepdim=True) / 255
    std = x_train.float().std((0, 2, 3), keepdim=True) / 255

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - mean) / std

    return TensorDataset(normalise(x_train), y_train), TensorDataset(normalise(x_test), y_test), classes


def load(name: str, data_dir: str | None = None, seed: int = 0) -> tuple[TensorDataset, TensorDataset, int]:
    if name == "digits":
        return digits(seed)
    if name in CIFAR:
        if data_dir is None:
            raise ValueError(f"--data {name} needs --data-dir pointing at the extracted python pickles")
        return cifar(name, data_dir)
    raise ValueError(f"unknown data set {name!r}; choose digits, cifar10 or cifar100")
