"""Train a tiny Llama with the Hugging Face Trainer and OIALR, then resume it from a checkpoint.

    python examples/hf_trainer.py            # offline, CPU, ~20 s; writes runs/hf_trainer/

The model is built from a LlamaConfig (nothing is downloaded); the data are arithmetic token sequences
(``x[t+1] = x[t] + k mod 64``), so the loss falls quickly.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import oialr
from oialr.integrations.transformers import OIALRCallback


def sequences(n=512, length=24, vocab=64):
    g = torch.Generator().manual_seed(0)
    start, step = torch.randint(0, vocab, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(length)) % vocab
    return [{"input_ids": x, "labels": x} for x in ids]


def trainer(max_steps=120):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    callback = OIALRCallback(oialr.OIALRConfig(warmup_steps=40, update_every=20, cutoff=0.2))
    args = TrainingArguments("runs/hf_trainer", max_steps=max_steps, per_device_train_batch_size=16,
                             gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=20, save_steps=60,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=sequences(), callbacks=[callback]), callback


if __name__ == "__main__":
    torch.set_num_threads(1)                             # a model this small runs fastest on one thread
    t, callback = trainer()
    t.train()                                            # checkpoints at steps 60 and 120 include oialr_state.pt
    print(callback.controller.table())
    t, callback = trainer()                              # a fresh model and Trainer, as after an interruption
    t.train(resume_from_checkpoint="runs/hf_trainer/checkpoint-60")
    summary = callback.controller.summary()
    print(f"resumed at step 60, ended at step {summary['step']}: trainable {summary['trainable_params']:,} "
          f"of {summary['dense_trainable_params']:,} dense parameters")
