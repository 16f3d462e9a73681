"""TRL's DPOTrainer side of scripts/sentiment_rl_recipe.py: run by the recipe in a separate virtual environment that
holds trl (the project's own never imports it). Trains the HF export of the starting policy on the recipe's pairs with
the settings llmctl's run used (sigmoid loss, no label smoothing, beta, steps, batch size, constant learning rate,
AdamW betas/eps, no weight decay, gradient clipping, float32, dropout off, the reference = the same starting model),
and writes the model plus the wall time of each optimizer step.

Usage: python sentiment_rl_trl.py SETTINGS.json   (keys: model, pairs, out, beta, lr, steps, batch_size, seed,
max_length, beta2, grad_clip)
"""

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (the first is the warm-up; the recipe leaves it out)."""

    def __init__(self):
        self.ends = []
        self.start = None

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter() - self.start)


def main(settings_path: str) -> None:
    s = json.loads(Path(settings_path).read_text())
    torch.manual_seed(s["seed"])
    tok = AutoTokenizer.from_pretrained(s["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(s["pairs"])]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    cfg = DPOConfig(
        output_dir=s["out"], per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=s["beta2"], adam_epsilon=1e-8, max_grad_norm=s["grad_clip"],
        beta=s["beta"], loss_type=["sigmoid"], label_smoothing=0.0, max_length=s["max_length"],
        disable_dropout=True, precompute_ref_log_probs=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], seed=s["seed"], data_seed=s["seed"],
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[clock])
    trainer.train()
    out = Path(s["out"])
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    json.dump({"step_ends": clock.ends, "log": logs, "threads": torch.get_num_threads()},
              open(out / "timing.json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
