"""Text classification with the transformers Trainer under DP: the Trainer class changed to
DPTrainer, and PrivacyArguments added. A tiny BERT from its config (random weights, no download)
learns a synthetic task: the label is written in the first token.

    python examples/bert_dptrainer.py --epochs 3
"""

from __future__ import annotations

import argparse

import torch
import transformers

from dpspeed.integrations.transformers import DPTrainer, PrivacyArguments

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--examples", type=int, default=512)
parser.add_argument("--out", default="/tmp/dpspeed-bert")
args = parser.parse_args()

torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64, num_labels=2)
model = transformers.BertForSequenceClassification(config)


def example(i: int) -> dict:
    ids = torch.randint(4, 100, (16,))
    ids[0] = 2 + i % 2
    return {"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": i % 2}


train = [example(i) for i in range(args.examples)]
trainer = DPTrainer(
    model=model,
    args=transformers.TrainingArguments(output_dir=args.out, per_device_train_batch_size=32,
                                        gradient_accumulation_steps=2, num_train_epochs=args.epochs,
                                        learning_rate=5e-3, logging_steps=4, save_strategy="no", report_to=[],
                                        use_cpu=not torch.cuda.is_available()),
    train_dataset=train,
    privacy_args=PrivacyArguments(target_epsilon=8.0, max_grad_norm=1.0, max_physical_batch_size=16),
)
trainer.train()
print(f"epsilon {trainer.get_epsilon():.2f} at delta {trainer.target_delta:.2g}")
