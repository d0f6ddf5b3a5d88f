"""The one-run audit: its statistics against direct binomial sums, a lower bound far above the claim
for deliberately broken engines (noise off, clipping off), below it for the real one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpspeed import PrivacyEngine
from dpspeed.apps.cli import main
from dpspeed.audit import AuditConfig, epsilon_lower_bound, p_value, run_audit

SMALL = AuditConfig(canaries=200, epochs=10, guesses=40)  # every included canary sampled, but with odds 3e-6


class NoiseOff(PrivacyEngine):
    """Claims the calibrated epsilon, adds no noise."""

    def make_private(self, **options):
        made = super().make_private(**options)
        self.optimizer.add_noise = lambda: None
        return made


class ClippingOff(PrivacyEngine):
    """Claims the calibrated epsilon, clips nothing."""

    def make_private(self, **options):
        made = super().make_private(**options)
        self.clipping.clip_fn = lambda norms, threshold: torch.ones_like(norms)
        return made


def test_the_p_value_is_a_binomial_tail_plus_the_delta_term():
    binomial = lambda k, n, p: math.comb(n, k) * p**k * (1 - p) ** (n - k)  # noqa: E731
    for guesses, correct, epsilon in [(10, 7, 0.0), (40, 30, 1.0), (40, 40, 3.0)]:
        q = 1 / (1 + math.exp(-epsilon))
        tail = sum(binomial(k, guesses, q) for k in range(correct, guesses + 1))
        assert p_value(100, guesses, correct, epsilon, 0.0) == pytest.approx(tail, rel=1e-9)
        assert p_value(100, guesses, correct, epsilon, 1e-3) >= p_value(100, guesses, correct, epsilon, 0.0)


def test_the_lower_bound_grows_with_the_evidence():
    assert epsilon_lower_bound(200, 40, 20, 1e-5, 0.95) == 0.0  # chance level: nothing ruled out
    perfect = [epsilon_lower_bound(1000, r, r, 1e-5, 0.95) for r in (20, 100, 200)]
    assert perfect == sorted(perfect) and perfect[-1] > 4
    bound = epsilon_lower_bound(1000, 200, 180, 1e-5, 0.95)
    assert p_value(1000, 200, 180, bound, 1e-5) < 0.05 <= p_value(1000, 200, 180, bound + 1e-3, 1e-5)


@pytest.mark.parametrize("broken", [NoiseOff, ClippingOff])
def test_a_broken_engine_is_caught(broken):
    result = run_audit(SMALL, broken)
    assert result.correct == result.guesses and result.epsilon_lower_bound > 2 * result.epsilon_claimed
    assert result.contradicts_claim


def test_the_real_engine_stays_below_its_claim():
    result = run_audit(SMALL)
    assert result.epsilon_lower_bound < result.epsilon_claimed and not result.contradicts_claim


def test_the_audit_command_writes_audit_json(tmp_path, capsys):
    assert main(["audit", "--canaries", "200", "--epochs", "3", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "audit.json").read_text())
    assert {"epsilon_lower_bound", "epsilon_claimed", "config"} <= set(written)
    assert "consistent with the claim" in capsys.readouterr().out
    assert main(["audit", "--canaries", "1", "--out", str(tmp_path)]) == 2
