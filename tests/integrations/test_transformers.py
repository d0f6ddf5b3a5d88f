"""DPTrainer: the transformers Trainer with DP-SGD by changing the class; tiny models from configs
(BERT classification, GPT-2 and a LoRA-wrapped Llama causal LM), on the CPU."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpspeed.integrations.transformers import DPTrainer, PrivacyArguments  # noqa: E402
from dpspeed.optimizer import DPOptimizer  # noqa: E402

TEXT = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 32}


def _classification(n: int = 96) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        ids = torch.randint(4, 40, (10,), generator=generator)
        ids[0] = 2 + i % 2  # the label, learnable from the first token
        data.append({"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": i % 2})
    return data


def _language(n: int = 48) -> list[dict]:
    """Sequences of different lengths, padded: each example's loss is the mean over its own tokens."""
    generator = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        length = 4 + i % 6
        ids = torch.randint(1, 40, (10,), generator=generator)
        labels = ids.clone()
        labels[length:] = -100
        data.append({"input_ids": ids, "attention_mask": (torch.arange(10) < length).long(), "labels": labels})
    return data


def _args(tmp_path, **options) -> transformers.TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=5e-3,
                    logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    return transformers.TrainingArguments(**{**defaults, **options})


def test_bert_classification_trains_privately_to_its_target_epsilon(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TEXT, num_labels=2))
    trainer = DPTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2, num_train_epochs=3),
                        train_dataset=_classification(),
                        privacy_args=PrivacyArguments(target_epsilon=3.0, max_physical_batch_size=5))
    assert trainer.args.gradient_accumulation_steps == 1 and trainer.args.max_grad_norm == 0
    assert trainer.logical_batch_size == 16
    trainer.train()
    assert isinstance(trainer._dp_optimizer, DPOptimizer)
    steps = trainer.state.global_step
    assert steps == 3 * 6 == trainer._dp_optimizer.logical_steps == trainer.engine.accountant.steps
    assert trainer.get_epsilon() == pytest.approx(3.0, rel=0.01)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("epsilon" in entry and "grad_norm" not in entry for entry in logged)
    assert [e["epsilon"] for e in logged] == sorted(e["epsilon"] for e in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_per_example_loss_of_a_causal_lm_is_each_examples_own_mean():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1,
                                                                 n_head=2)).eval()  # no dropout
    batch = {k: torch.stack([d[k] for d in _language(3)]) for k in ("input_ids", "attention_mask", "labels")}
    losses = DPTrainer.per_example_loss(None, model, batch)
    for i in range(3):
        alone = model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1],
                      labels=batch["labels"][i : i + 1]).loss  # transformers' loss of one example
        assert float(losses[i]) == pytest.approx(float(alone), rel=1e-5)


def test_lora_llama_generates_mid_training_and_resumes_epsilon_from_a_checkpoint(tmp_path):
    peft = pytest.importorskip("peft")

    def lora_llama():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**TEXT, num_key_value_heads=1, tie_word_embeddings=True)
        return peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                   peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))

    generated = []

    class Generate(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                generated.append(model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False))

    privacy = PrivacyArguments(noise_multiplier=1.0)
    first = DPTrainer(model=lora_llama(), args=_args(tmp_path, save_strategy="epoch"), train_dataset=_language(),
                      privacy_args=privacy, callbacks=[Generate()])
    first.train()
    assert generated and generated[0].shape == (1, 6)
    after_one_epoch = tmp_path / "checkpoint-6"
    resumed = DPTrainer(model=lora_llama(), args=_args(tmp_path, num_train_epochs=3), train_dataset=_language(),
                        privacy_args=privacy)
    resumed.train(resume_from_checkpoint=str(after_one_epoch))
    assert resumed.engine.accountant.steps == resumed.state.global_step == 18  # 6 restored, 12 trained
    assert resumed.get_epsilon() > first.get_epsilon()


def test_privacy_arguments_need_a_target_or_a_noise_multiplier():
    with pytest.raises(ValueError, match="target_epsilon or noise_multiplier"):
        PrivacyArguments()
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyArguments(target_epsilon=1.0, noise_multiplier=1.0)


def test_two_pass_modes_are_refused_and_a_compiled_causal_lm_is_still_shifted(tmp_path):
    from dpspeed.integrations.transformers import _is_causal_lm

    with pytest.raises(ValueError, match="one-pass mode"):
        PrivacyArguments(noise_multiplier=1.0, clipping_mode="ghost")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1,
                                                                n_head=2))
    assert _is_causal_lm(torch.compile(gpt2)) and not _is_causal_lm(
        transformers.BertForSequenceClassification(transformers.BertConfig(**TEXT)))
    trainer = DPTrainer(model=gpt2, args=_args(tmp_path), train_dataset=_language(8),
                        privacy_args=PrivacyArguments(noise_multiplier=1.0))
    assert trainer.args.ignore_data_skip  # a resumed epoch draws fresh Poisson batches, skips nothing
