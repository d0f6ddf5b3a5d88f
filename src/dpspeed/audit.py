"""An empirical privacy audit in one training run (Steinke, Nasr & Jagielski, 2023).

m canary examples are made, and each is put in the training set with probability 1/2, by a coin
nobody else sees. The model trains once, with the engine under test. Each canary is then scored
by how far training moved the weights that only it touches; the auditor guesses "in" for the
highest scores and "out" for the lowest. If the training is (ε, δ)-DP, the number of correct
guesses cannot exceed what ε-randomised response would give, except with a small probability;
the largest ε that this run's guesses rule out at the chosen confidence is an empirical lower
bound on the true ε. A lower bound above the claimed ε means the claim is false.

The canaries are white-box gradient canaries: canary i is the example whose only non-zero input
is a private extra feature i, so its gradient lands in column i of the first layer and nowhere
else; its score is the move of that column towards the canary's own label.
"""

from __future__ import annotations

import json
import math
import platform
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import __version__
from .engine import PrivacyEngine


@dataclass
class AuditConfig:
    canaries: int = 1000
    epsilon: float = 1.0  # the claim: the noise is calibrated to it
    delta: float = 1e-5
    epochs: int = 20
    batch_size: int = 256
    lr: float = 2.0
    max_grad_norm: float = 1.0
    clipping_mode: str = "auto"
    guesses: int | None = None  # "in" and "out" guesses together (default: a fifth of the canaries)
    confidence: float = 0.95
    out: str | None = None

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(f"canaries must be at least 2, got {self.canaries}")
        if self.guesses is not None and not 1 <= self.guesses <= self.canaries:
            raise ValueError(f"guesses must be between 1 and canaries ({self.canaries}), got {self.guesses}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")


@dataclass
class AuditResult:
    epsilon_lower_bound: float
    epsilon_claimed: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    confidence: float
    seconds: float
    config: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    @property
    def contradicts_claim(self) -> bool:
        """The run rules out the claimed epsilon (at the audit's confidence)."""
        return self.epsilon_lower_bound > self.epsilon_claimed


def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1:
        return 0.0 if k == n else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability of at least `correct` right guesses out of `guesses` if the training were
    (epsilon, delta)-DP (Steinke et al. 2023, Theorem 5.2): a binomial tail at the accuracy of
    epsilon-randomised response, plus 2·m·delta times the largest average of the tail's nearest
    terms."""
    accuracy = 1 / (1 + math.exp(-epsilon))
    pmf = [math.exp(_log_binomial_pmf(k, guesses, accuracy)) for k in range(guesses + 1)]
    tail = sum(pmf[correct:])
    below, worst = 0.0, 0.0
    for i in range(1, correct + 1):
        below += pmf[correct - i]
        worst = max(worst, below / i)
    return min(1.0, tail + 2 * canaries * delta * worst)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """The largest epsilon whose p-value for this outcome is below 1 - confidence (0 if none)."""
    level = 1 - confidence
    if p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(canaries, guesses, correct, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(canaries, guesses, correct, middle, delta) < level else (low, middle)
    return low


#: the canaries' input value: their gradients are far above any threshold, so that training without
#: clipping lets them through loudly (with clipping they add R like any other example)
LOUDNESS = 100.0


def _digits_with_canaries(canaries: int, generator: torch.Generator) -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    """Digits with `canaries` extra input features, zero for the real examples; canary i has
    feature i set (to LOUDNESS) and a random label. Returns the training set (with the included canaries), which
    canaries are in, and their labels."""
    from .apps.data import digits

    train, _, classes = digits(0)
    x, y = train.tensors
    x = torch.cat([x.flatten(1), torch.zeros(len(x), canaries)], dim=1)
    canary_x = torch.cat([torch.zeros(canaries, x.shape[1] - canaries), LOUDNESS * torch.eye(canaries)], dim=1)
    canary_y = torch.randint(0, classes, (canaries,), generator=generator)
    included = torch.rand(canaries, generator=generator) < 0.5
    data = TensorDataset(torch.cat([x, canary_x[included]]), torch.cat([y, canary_y[included]]))
    return data, included, canary_y


def _scores(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, canaries: int) -> torch.Tensor:
    """How far training moved each canary's column of the first layer towards its label's row."""
    moved = (after - before)[:, -canaries:]  # (classes, canaries)
    towards = F.one_hot(labels, moved.shape[0]).T.float() - 1 / moved.shape[0]
    return (moved * towards).sum(0)


def run_audit(config: AuditConfig = AuditConfig(), engine: Callable[[], PrivacyEngine] = PrivacyEngine,
              show_progress: bool = False) -> AuditResult:
    """Audit one training run of a linear classifier on digits with the engine `engine()` makes."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(secrets.randbits(63))  # the coins: nobody else sees them
    data, included, labels = _digits_with_canaries(config.canaries, generator)
    model = nn.Linear(data.tensors[0].shape[1], 10)
    before = model.weight.detach().clone()
    private = engine()
    model, optimizer, loader = private.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=config.lr),
        data_loader=DataLoader(data, batch_size=config.batch_size), target_epsilon=config.epsilon,
        target_delta=config.delta, epochs=config.epochs, max_grad_norm=config.max_grad_norm,
        clipping_mode=config.clipping_mode,
    )
    for _ in range(config.epochs):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    private.detach()
    scores = _scores(before, model.weight.detach(), labels, config.canaries)
    guesses = config.guesses or config.canaries // 5
    order = torch.argsort(scores, descending=True)
    said_in, said_out = order[: guesses // 2], order[len(order) - (guesses - guesses // 2):]
    correct = int(included[said_in].sum()) + int((~included[said_out]).sum())
    result = AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(config.canaries, guesses, correct, config.delta, config.confidence),
        epsilon_claimed=config.epsilon, delta=config.delta, canaries=config.canaries, guesses=guesses,
        correct=correct, confidence=config.confidence, seconds=time.perf_counter() - start, config=asdict(config),
        environment={"dpspeed": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")},
    )
    if config.out:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "audit.json").write_text(json.dumps(asdict(result), indent=2))
    return result
