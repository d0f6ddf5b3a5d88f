"""Privacy accounting through Google's dp-accounting package: a history of Poisson-subsampled
Gaussian steps, turned into (epsilon, delta) by its PLD or RDP accountant."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

ACCOUNTANTS = ("pld", "rdp")


#: the PLD accountant's grid of privacy-loss values. dp-accounting's default is 1e-4; on 1e-3 an
#: epsilon costs a tenth of the time (digits, 240 steps: 0.04 s, not 0.4 s), and as the grid is
#: pessimistic (connect-the-dots) it stays an upper bound: within 1% at epsilon ~ 1 and above, about
#: 5% at epsilon ~ 0.03, where the grid's step is a larger part of epsilon
PLD_DISCRETIZATION = 1e-3


def _fresh(kind: str) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    if kind == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    raise ValueError(f"unknown accountant {kind!r}; choose one of {ACCOUNTANTS}")


def dp_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` compositions of the Gaussian mechanism on a Poisson sample of rate `sample_rate`."""
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def extends(old: list[list], new: list[list]) -> bool:
    """Whether history `new` is `old` with steps added (to its last run, or as new runs)."""
    last = len(old) - 1
    return len(old) <= len(new) and all(
        a[:2] == b[:2] and (a[2] == b[2] or (i == last and a[2] < b[2])) for i, (a, b) in enumerate(zip(old, new)))


class _IncrementalPLD:
    """The privacy-loss distribution of a history of runs, kept between queries and extended by
    the steps taken since: one step composed onto it costs milliseconds, where composing every
    step again costs a tenth of a second. The same distribution as PLDAccountant's (tested)."""

    def __init__(self):
        self.covered: list[list] = []
        self.pld = None
        self._one_step: dict[tuple[float, float], object] = {}

    def _step(self, sigma: float, rate: float):
        if (sigma, rate) not in self._one_step:
            self._one_step[sigma, rate] = privacy_loss_distribution.from_gaussian_mechanism(
                sigma, sampling_prob=rate, use_connect_dots=True, value_discretization_interval=PLD_DISCRETIZATION)
        return self._one_step[sigma, rate]

    def of(self, history: list[list]):
        """The distribution after `history` (None for no steps)."""
        if not extends(self.covered, history):
            self.covered, self.pld = [], None
        for i, (sigma, rate, count) in enumerate(history):
            extra = count - (self.covered[i][2] if i < len(self.covered) else 0)
            if extra:
                added = self._step(sigma, rate).self_compose(extra) if extra > 1 else self._step(sigma, rate)
                self.pld = added if self.pld is None else self.pld.compose(added)
        self.covered = [list(run) for run in history]
        return self.pld


class Accountant:
    """The steps actually taken, as [noise_multiplier, sample_rate, steps] runs."""

    def __init__(self, kind: str = "pld"):
        _fresh(kind)  # validates the name
        self.kind = kind
        self.history: list[list] = []
        self._pld = _IncrementalPLD()

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += 1
        else:
            self.history.append([noise_multiplier, sample_rate, 1])

    @property
    def steps(self) -> int:
        return sum(run[2] for run in self.history)

    def _composed(self, delta: float) -> dp_accounting.PrivacyAccountant:
        _check_delta(delta)
        accountant = _fresh(self.kind)
        with _quiet_absl():  # the RDP orders' convergence warnings come while composing
            for sigma, rate, steps in self.history:
                accountant.compose(dp_event(sigma, rate, steps))
        return accountant

    def get_epsilon(self, delta: float) -> float:
        if self.kind == "pld":
            _check_delta(delta)
            if any(sigma == 0 and steps for sigma, _, steps in self.history):
                return math.inf  # a step without noise protects nothing
            pld = self._pld.of(self.history)
            return 0.0 if pld is None else float(pld.get_epsilon_for_delta(delta))
        accountant = self._composed(delta)
        with _quiet_absl():
            return float(accountant.get_epsilon(delta))

    def get_privacy_spent(self, delta: float) -> tuple[float, float | None]:
        """(epsilon, the best Renyi order) as Opacus's RDP accountant gives them; the order is None
        for the PLD accountant, which has none."""
        if self.kind != "rdp":
            return self.get_epsilon(delta), None
        accountant = self._composed(delta)
        with _quiet_absl():
            epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
        return float(epsilon), float(order)

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {"kind": self.kind, "history": [list(run) for run in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.kind = state["kind"]
        self.history = [list(run) for run in state["history"]]


class BudgetExhausted(RuntimeError):
    """The next step would spend more than the run's max_epsilon; nothing of it was released."""


class BudgetGuard:
    """Refuses the step after which epsilon (at `delta`) would exceed `max_epsilon`.

    epsilon grows with every step, so once it is known to stay within the budget after k more
    steps, the next k steps need no accounting; the horizon doubles while it holds and is
    bisected when it does not, so a run of K steps costs O(log K) epsilon computations."""

    def __init__(self, accountant: Accountant, max_epsilon: float, delta: float):
        if not 0 < max_epsilon:
            raise ValueError(f"max_epsilon must be positive, got {max_epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"the delta of max_epsilon must be in (0, 1), got {delta}")
        self.accountant, self.max_epsilon, self.delta = accountant, max_epsilon, delta
        self._safe_through = 0  # steps (counted from the start) known to stay within the budget
        self._key: tuple | None = None  # (sigma, q) the horizon was computed for
        self._basis: list[list] = []  # the history it was computed from

    def _within(self, extra: int, noise_multiplier: float, sample_rate: float) -> bool:
        ahead = Accountant(self.accountant.kind)
        ahead.history = [list(run) for run in self.accountant.history] + [[noise_multiplier, sample_rate, extra]]
        return ahead.get_epsilon(self.delta) <= self.max_epsilon

    def _horizon_holds(self, key: list) -> bool:
        """Whether the history is the one the horizon was computed from plus steps at its (sigma, q)
        only: not after a new sigma or q, or a history replaced (a checkpoint loaded)."""
        history = self.accountant.history
        if self._key != tuple(key) or not extends(self._basis, history):
            return False
        added = [run for i, run in enumerate(history) if i >= len(self._basis) or run != self._basis[i]]
        return all(run[:2] == key for run in added)

    def check(self, noise_multiplier: float, sample_rate: float) -> None:
        """Before a step: raise BudgetExhausted if it would exceed the budget."""
        taken = self.accountant.steps
        if not self._horizon_holds([noise_multiplier, sample_rate]):
            self._key, self._safe_through = (noise_multiplier, sample_rate), taken
        if taken < self._safe_through:
            return
        if not self._within(1, noise_multiplier, sample_rate):
            raise BudgetExhausted(
                f"stopping before step {taken + 1}: it would spend more than max_epsilon = {self.max_epsilon:g} at "
                f"delta = {self.delta:g} (epsilon is {self.accountant.get_epsilon(self.delta):.4g} after {taken} "
                "steps). Save the model now; training further needs a larger budget")
        good, bad = 1, None
        while bad is None and good < 2**20:
            if self._within(2 * good, noise_multiplier, sample_rate):
                good *= 2
            else:
                bad = 2 * good
        while bad is not None and bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if self._within(middle, noise_multiplier, sample_rate) else (good, middle)
        self._safe_through, self._basis = taken + good, [list(run) for run in self.accountant.history]


#: above this, e^epsilon bounds nothing an attacker cares about, and calibration does not converge
MAX_TARGET_EPSILON = 100.0


def epsilon_at(kind: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               spent: Sequence[list] = ()) -> float:
    """epsilon after `steps` Poisson-sampled Gaussian steps (after the runs `spent`), by the `kind` accountant."""
    accountant = _fresh(kind)
    with _quiet_absl():
        accountant.compose(_after(spent, noise_multiplier, sample_rate, steps))
        return float(accountant.get_epsilon(delta))


def _pld_upper(target_epsilon: float, delta: float, sample_rate: float, steps: int, spent: Sequence[list]) -> float:
    """A noise multiplier that PLD's epsilon stays within the target at, by doubling."""
    sigma = 1.0
    while epsilon_at("pld", sigma, sample_rate, steps, delta, spent) > target_epsilon:
        if sigma > 1e6:
            raise ValueError(f"no noise multiplier gives epsilon={target_epsilon}; check the target")
        sigma *= 2
    return sigma


def _pld_bracket(upper: float, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                 spent: Sequence[list]):
    """An interval around PLD's answer below RDP's (`upper`, never below it): halved until PLD's
    epsilon at its lower end exceeds the target."""
    lower = 0.5 * upper
    for _ in range(30):
        if epsilon_at("pld", lower, sample_rate, steps, delta, spent) > target_epsilon:
            return dp_accounting.ExplicitBracketInterval(lower, upper * 1.0001)
        upper, lower = lower, 0.5 * lower
    raise ValueError(f"no noise multiplier above {lower:.3g} gives epsilon={target_epsilon}; check the target")


def _after(spent: Sequence[list], noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The runs of `spent` ([sigma, q, steps] each), then `steps` steps at (noise_multiplier, sample_rate)."""
    upcoming = dp_event(noise_multiplier, sample_rate, steps)
    return dp_accounting.ComposedDpEvent([dp_event(*run) for run in spent] + [upcoming]) if spent else upcoming


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "pld",
                      spent: Sequence[list] = ()) -> float:
    """The smallest noise multiplier that gives at most `target_epsilon` after `steps` steps, which
    come after the runs already `spent` ([sigma, q, steps] each, an accountant's history)."""
    if not 0 < target_epsilon <= MAX_TARGET_EPSILON:
        raise ValueError(
            f"target_epsilon must be in (0, {MAX_TARGET_EPSILON:g}], got {target_epsilon}: above that the guarantee "
            "means nothing; pass noise_multiplier= to make_private to train with little noise"
        )
    if not 0 < delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {delta}")
    if steps < 1:
        raise ValueError(f"the training must take at least one step, got {steps}")
    if spent:
        already = Accountant(kind)
        already.history = [list(run) for run in spent]
        if already.get_epsilon(delta) >= target_epsilon:
            raise ValueError(f"the {already.steps} steps taken already spent epsilon = "
                             f"{already.get_epsilon(delta):.4g} >= target_epsilon = {target_epsilon:g}")

    def calibrate(accountant: str, bracket) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _fresh(accountant),
                lambda sigma: _after(spent, sigma, sample_rate, steps),
                target_epsilon,
                delta,
                bracket_interval=bracket,
                tol=1e-4,
            )
        )

    with _quiet_absl():
        # RDP is fast and never below PLD's answer: it brackets the (slower, tighter) PLD search
        try:
            upper = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(0.0, 1.0))
        except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:  # RDP's epsilon of `spent` is above it
            if kind == "rdp":
                raise ValueError(f"the steps taken already spent RDP's epsilon >= {target_epsilon:g}") from None
            upper = _pld_upper(target_epsilon, delta, sample_rate, steps, spent)
        if kind == "rdp":
            return upper
        return calibrate("pld", _pld_bracket(upper, target_epsilon, delta, sample_rate, steps, spent))


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting logs a warning for every RDP order it drops; keep them out of the user's log."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)
