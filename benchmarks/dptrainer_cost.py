"""What DPTrainer costs against the plain transformers Trainer on the same tiny BERT classifier,
on the CPU: train() wall time over the same number of optimizer steps, the two trainers taking
turns (rounds) so that drifts of a shared machine hit both alike; median over rounds.

DPTrainer is timed with a given noise multiplier (no calibration) and, separately, with a target
epsilon (the calibration of the noise before training is part of its time).

    python benchmarks/dptrainer_cost.py --out benchmarks/results/cpu_dptrainer_cost.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from dpspeed.bench.study import write_result
from dpspeed.integrations.transformers import DPTrainer, PrivacyArguments


def _data(n: int, length: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(4, 1000, (length,), generator=generator)
        ids[0] = 2 + i % 2
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": i % 2})
    return rows


def _seconds(kind: str, data: list[dict], batch: int, epochs: int) -> tuple[float, int]:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=batch, num_train_epochs=epochs,
                                              learning_rate=1e-3, logging_steps=1000, save_strategy="no", report_to=[],
                                              use_cpu=True, disable_tqdm=True)
        if kind == "Trainer":
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        else:
            privacy = PrivacyArguments(target_epsilon=8.0) if kind == "DPTrainer, target epsilon" else (
                PrivacyArguments(noise_multiplier=1.0))
            trainer = DPTrainer(model=model, args=args, train_dataset=data, privacy_args=privacy)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, trainer.state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    data = _data(args.examples, args.length)
    kinds = ["Trainer", "DPTrainer, noise multiplier", "DPTrainer, target epsilon"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    steps: dict[str, int] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            seconds, steps[kind] = _seconds(kind, data, args.batch, args.epochs)
            times[kind].append(seconds)
    base = statistics.median(times["Trainer"]) / steps["Trainer"]
    rows = []
    for kind in kinds:
        per_step = statistics.median(times[kind]) / steps[kind]
        rows.append({"trainer": kind, "steps": steps[kind], "seconds": times[kind], "ms_per_step": 1e3 * per_step,
                     "relative_cost": per_step / base})
        print(f"{kind:30s} {steps[kind]:4d} steps  {1e3 * per_step:7.1f} ms/step  {per_step / base:5.2f}x the Trainer's")
    if args.out:
        write_result(args.out, torch.device("cpu"), args, rows)


if __name__ == "__main__":
    main()
