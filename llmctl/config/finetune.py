"""The `finetune:` section: what `llmctl finetune` learns and how (docs/finetuning.md, docs/compression.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .whole import Whole

ADAPTER_METHODS = ("lora", "qlora")  # methods that train LoRA adapters beside a frozen base


@dataclass
class FinetuneConfig:
    """What `llmctl finetune` trains: the task, the method, and what stays frozen."""

    task: Literal["lm", "classification", "instruct", "distill", "dpo", "grpo"] = "lm"
    """What is learned: next token (lm), a label per text (classification), responses to instructions (instruct),
    a teacher's next-token distributions (distill), a preference for one answer over another (dpo), or answers
    that score high on rewards you write (grpo: online reinforcement learning)."""
    method: Literal["full", "lora", "qlora"] = "full"
    """Train every weight (full), low-rank adapters beside frozen weights (lora), or the same adapters beside frozen
    linear weights stored in 4-bit NF4 (qlora: needs the qlora extra, torchao; docs/finetuning.md)."""
    labels: Optional[list[str]] = None
    """Classification: the label names in order; null: the sorted values found in the data."""
    pooling: Optional[Literal["last", "mean", "cls"]] = None
    """Classification: the head reads the final <eos> token's state (last), the mean over the text (mean), or the
    first, [CLS], token's (cls: encoders only); null: cls for an encoder (model.causal=false), else last."""
    lora_rank: int = 8
    """Rank of each LoRA adapter."""
    lora_alpha: float = 16.0
    """LoRA scaling: an adapter's update is multiplied by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input in training; 0: none."""
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    """Layers that get adapters: any of attn.qkv, attn.proj, mlp.fc, mlp.proj, and wte (the token embedding)."""
    freeze_embeddings: bool = False
    """Keep the token (and position) embeddings frozen."""
    freeze_blocks: int = 0
    """Keep the first N Transformer blocks frozen; 0: none."""
    instruction_field: str = "instruction"
    """Instruct data: the field holding the instruction."""
    input_field: str = "input"
    """Instruct data: the field holding the optional input of an instruction."""
    output_field: str = "output"
    """Instruct data: the field holding the expected response."""
    instances_field: str = "instances"
    """Instruct data in the seed_tasks.jsonl layout: the field holding a list of {input, output} per instruction."""
    prompt_field: str = "prompt"
    """Instruct data in the prompt/response layout: the field holding the prompt."""
    response_field: str = "response"
    """Instruct data in the prompt/response layout: the field holding the response."""
    prompt_template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    """Instruct: the prompt of an example with an input; must contain {instruction}."""
    prompt_template_no_input: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    """Instruct: the prompt of an example without an input (and of each chat turn); must contain {instruction}."""
    packing: bool = False
    """Instruct: pack examples into full blocks instead of padding each batch."""
    teacher: Optional[str] = None
    """Distill: the teacher, a run directory or checkpoint sharing the student's tokenizer; null: none."""
    distill_alpha: float = 0.5
    """Distill: loss = alpha x T^2 x KL(teacher || student) + (1 - alpha) x cross-entropy."""
    distill_temperature: float = 1.0
    """Distill: T, the temperature both distributions are softened by."""

    chosen_field: str = "chosen"
    """DPO data: the field holding the preferred answer (a string, or a list of messages); the prompt is in
    prompt_field."""
    rejected_field: str = "rejected"
    """DPO data: the field holding the dispreferred answer (a string, or a list of messages)."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO: the loss on the margin of log-ratios to the reference: sigmoid (the DPO paper's) or ipo (squared
    distance of the length-averaged margin from 1 / (2 beta))."""
    beta: float = 0.1
    """DPO: how far from the reference the policy may move (higher: closer); rewards are beta x log-ratio. GRPO:
    the weight of the KL penalty to the reference (k3 estimator per token); 0: no penalty."""
    label_smoothing: float = 0.0
    """DPO (sigmoid): the assumed fraction of pairs whose preference is flipped (conservative DPO); 0: none."""

    group_size: int = 4
    """GRPO: completions sampled per prompt (G); each one's advantage is its reward against its group's."""
    scale_rewards: bool = True
    """GRPO: divide each advantage (reward - group mean) by the group's standard deviation (+ 1e-4), as TRL and
    DeepSeek do; false: leave it unscaled (Dr. GRPO)."""
    clip_eps: float = 0.2
    """GRPO: the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps] (PPO's clipped objective)."""
    grpo_iterations: int = 1
    """GRPO: policy updates (steps) per batch of generated completions; 1: generate for every step."""
    reward: list[str] = field(default_factory=list)
    """GRPO: the reward(s): module:function, path.py:function (relative to the working directory) or
    classifier:RUN:LABEL (a classifier checkpoint's probability of LABEL); several are added with reward_weights."""
    reward_weights: Optional[list[float]] = None
    """GRPO: one weight per reward, in order; null: 1 each."""

    def _check_grpo(self, cfg: Whole) -> list[str]:
        """GRPO's settings (and the reward settings a task other than grpo does not read)."""
        f, p = self, []
        if f.task != "grpo":
            if f.reward:
                p.append(f"finetune.reward is set but finetune.task={f.task}; set finetune.task=grpo or remove it")
            return p
        if not f.reward:
            p.append("finetune.reward: finetune.task=grpo needs a reward (module:function, path.py:function or "
                     "classifier:RUN:LABEL)")
        if f.reward_weights is not None and len(f.reward_weights) != len(f.reward):
            p.append(f"finetune.reward_weights: give one weight per reward ({len(f.reward)}), got "
                     f"{len(f.reward_weights)}")
        if f.group_size < 2:
            p.append(f"finetune.group_size: GRPO compares each completion with the others of its group, so it needs "
                     f"at least 2 per prompt (got {f.group_size})")
        if getattr(getattr(cfg, "generate", None), "temperature", 1.0) == 0:
            p.append("generate.temperature=0 samples the same completion G times, so GRPO has nothing to compare; "
                     "set it above 0 for finetune.task=grpo")
        if f.clip_eps <= 0:
            p.append(f"finetune.clip_eps: must be positive (got {f.clip_eps})")
        if f.grpo_iterations < 1:
            p.append(f"finetune.grpo_iterations: must be at least 1 (got {f.grpo_iterations})")
        if f.packing:
            p.append("finetune.packing: GRPO's completions are not packed; set it to false for finetune.task=grpo")
        return p

    def check(self, cfg: Whole) -> list[str]:
        """Impossible finetuning settings (freeze_blocks against cfg.model)."""
        f, m = self, cfg.model
        p: list[str] = []
        if f.lora_rank < 1 or f.lora_alpha <= 0 or not 0.0 <= f.lora_dropout < 1.0:
            p.append("finetune.lora_rank must be at least 1, lora_alpha positive and lora_dropout in [0, 1)")
        if f.method in ADAPTER_METHODS and not f.lora_targets:
            p.append("finetune.lora_targets: name at least one layer (attn.qkv, attn.proj, mlp.fc, mlp.proj, wte)")
        if f.freeze_blocks < 0 or (m.n_layer >= 1 and f.freeze_blocks > m.n_layer):
            p.append(f"finetune.freeze_blocks: must be between 0 and model.n_layer={m.n_layer} (got {f.freeze_blocks})")
        if f.pooling == "cls" and m.causal:
            p.append("finetune.pooling=cls: a decoder's first token sees only itself; use last or mean (cls is for "
                     "encoders, model.causal=false)")
        if not m.causal and f.task in ("instruct", "distill", "dpo", "grpo"):
            p.append(f"finetune.task={f.task}: an encoder (model.causal=false) does not generate; it learns "
                     "classification, or lm with train.objective=mlm")
        if f.labels is not None and len(set(f.labels)) < 2:
            p.append("finetune.labels: a classifier needs at least two distinct labels")
        if f.task == "distill" and not f.teacher:
            p.append("finetune.teacher: finetune.task=distill needs a teacher (a run directory or checkpoint)")
        if f.teacher and f.task != "distill":
            p.append(f"finetune.teacher is set but finetune.task={f.task}; set finetune.task=distill or remove it")
        if not 0.0 <= f.distill_alpha <= 1.0:
            p.append(f"finetune.distill_alpha: must be in [0, 1] (got {f.distill_alpha})")
        if f.distill_temperature <= 0:
            p.append(f"finetune.distill_temperature: must be positive (got {f.distill_temperature})")
        if f.packing and f.task == "dpo":
            p.append("finetune.packing: preference pairs are not packed (each pair's two answers are compared); "
                     "set it to false for finetune.task=dpo")
        if f.beta < 0 or (f.beta == 0 and f.task != "grpo"):
            p.append(f"finetune.beta: must be positive (got {f.beta})")
        if not 0.0 <= f.label_smoothing < 0.5:
            p.append(f"finetune.label_smoothing: must be in [0, 0.5) (got {f.label_smoothing})")
        p += self._check_grpo(cfg)
        if f.label_smoothing and f.dpo_loss != "sigmoid":
            p.append(f"finetune.label_smoothing applies to dpo_loss=sigmoid only (dpo_loss is {f.dpo_loss}); "
                     "set it to 0")
        for name in ("prompt_template", "prompt_template_no_input"):
            if "{instruction}" not in getattr(f, name):
                p.append(f"finetune.{name}: must contain {{instruction}}")
        return p
