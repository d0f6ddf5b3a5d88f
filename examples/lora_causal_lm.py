"""LoRA fine-tuning of a small causal language model under DP, with peft and DPTrainer: only the
adapters train, each sequence's loss is the mean over its own tokens, and the model generates
text after training. A tiny Llama from its config (random weights, no download).

    python examples/lora_causal_lm.py --epochs 2
"""

from __future__ import annotations

import argparse

import peft
import torch
import transformers

from dpspeed.integrations.transformers import DPTrainer, PrivacyArguments

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--examples", type=int, default=256)
parser.add_argument("--out", default="/tmp/dpspeed-lora")
args = parser.parse_args()

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
model.print_trainable_parameters()


def sequence(i: int) -> dict:
    """Counting sequences of different lengths, padded with -100 labels."""
    length = 8 + i % 8
    ids = (torch.arange(16) + i) % 60 + 4
    labels = ids.clone()
    labels[length:] = -100
    return {"input_ids": ids, "attention_mask": (torch.arange(16) < length).long(), "labels": labels}


trainer = DPTrainer(
    model=model,
    args=transformers.TrainingArguments(output_dir=args.out, per_device_train_batch_size=32, num_train_epochs=args.epochs,
                                        learning_rate=1e-2, logging_steps=4, save_strategy="no", report_to=[],
                                        use_cpu=not torch.cuda.is_available()),
    train_dataset=[sequence(i) for i in range(args.examples)],
    privacy_args=PrivacyArguments(noise_multiplier=0.8, max_grad_norm=1.0),
)
trainer.train()
prompt = torch.tensor([[10, 11, 12, 13]], device=trainer.args.device)
print("generated:", model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)[0].tolist())
print(f"epsilon {trainer.get_epsilon():.2f} at delta {trainer.target_delta:.2g}")
