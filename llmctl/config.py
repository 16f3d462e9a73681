"""Typed configuration: dataclass defaults, YAML files that hold only what differs, dotted overrides.

`load_config(path, overrides)` merges defaults <- YAML <- `--set a.b=c` overrides, checks every key and value,
and raises one `LlmctlError` that lists every problem at once. Values that are merely odd are adjusted and
reported through `Config.warnings` (the CLI prints them).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from . import sampling
from .errors import LlmctlError

# the precisions and weight formats generation runs in (generate.dtype / --dtype, generate.quantize / --quantize)
INFER_DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE_MODES = ("auto", "none", "int8")


def default_cache_dir() -> str:
    """Where token caches and downloads live unless `data.cache_dir` says otherwise."""
    return os.environ.get("LLMCTL_CACHE_DIR") or str(Path.home() / ".cache" / "llmctl")


@dataclass
class ModelConfig:
    """Shape of the decoder-only Transformer; `arch` picks the GPT-2 or the LLaMA flavour."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: Optional[int] = None  # None: n_head (no grouped-query attention)
    n_embd: int = 384
    head_dim: Optional[int] = None  # llama only; None: n_embd / n_head (a pruned model keeps its parent's)
    block_size: int = 256  # context length in tokens
    vocab_size: Optional[int] = None  # None: the tokenizer's size, rounded up to vocab_multiple
    vocab_multiple: int = 1  # pad the embedding to a multiple of this (64 helps GPUs)
    mlp_hidden: Optional[int] = None  # None: 4*n_embd (gpt2), 2/3*4*n_embd rounded up to 64 (llama)
    bias: Optional[bool] = None  # biases in linear layers and LayerNorm; None: True for gpt2, False for llama
    tie_embeddings: Optional[bool] = None  # share input embedding and output head; None: True for gpt2, False for llama
    activation: Literal["gelu", "gelu_tanh"] = "gelu"  # gpt2 flavour only (llama uses SwiGLU)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama flavour only
    dropout: float = 0.0
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """Channels per attention head: model.head_dim, or n_embd / n_head."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return 64 * ((int(2 * 4 * self.n_embd / 3) + 63) // 64)

    @property
    def has_bias(self) -> bool:
        return self.arch == "gpt2" if self.bias is None else self.bias

    @property
    def tied(self) -> bool:
        return self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    def check(self, cfg: "Config") -> list[str]:
        """Impossible shapes: what no Transformer can be built with."""
        m = self
        p: list[str] = []
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_multiple"):
            if getattr(m, name) < 1:
                p.append(f"model.{name}: must be at least 1 (got {getattr(m, name)})")
        if m.head_dim is not None:
            if m.head_dim < 1:
                p.append(f"model.head_dim: must be at least 1, or null for n_embd / n_head (got {m.head_dim})")
            elif m.arch == "gpt2" and m.head_dim * m.n_head != m.n_embd:
                p.append(f"model.head_dim: GPT-2 has no separate head size (transformers' GPT-2 cannot load it); "
                         f"it is n_embd / n_head = {m.n_embd / max(m.n_head, 1):g}: remove model.head_dim")
        elif m.n_head >= 1 and m.n_embd >= 1 and m.n_embd % m.n_head:
            p.append(f"model.n_embd: {m.n_embd} is not divisible by model.n_head={m.n_head}; pick sizes where it is "
                     "(or set model.head_dim, llama only)")
        if m.n_kv_head is not None:
            if m.n_kv_head < 1 or (m.n_head >= 1 and m.n_head % m.n_kv_head):
                p.append(f"model.n_kv_head: must divide model.n_head={m.n_head} (got {m.n_kv_head})")
            elif m.arch == "gpt2" and m.n_kv_head != m.n_head:
                p.append("model.n_kv_head: grouped-query attention needs model.arch=llama (GPT-2 has none)")
        sized = m.head_dim is not None or (m.n_head >= 1 and m.n_embd % m.n_head == 0)  # (else reported above)
        if m.arch == "llama" and sized and m.head_size % 2:
            p.append(f"model.head_dim: RoPE needs an even head size (got {m.head_size})")
        if m.vocab_size is not None and m.vocab_size < 1:
            p.append(f"model.vocab_size: must be positive (got {m.vocab_size})")
        if m.mlp_hidden is not None and m.mlp_hidden < 1:
            p.append(f"model.mlp_hidden: must be positive (got {m.mlp_hidden})")
        if not 0.0 <= m.dropout < 1.0:
            p.append(f"model.dropout: must be in [0, 1) (got {m.dropout})")
        if m.norm_eps <= 0 or m.rope_theta <= 0 or m.init_std <= 0:
            p.append("model.norm_eps, model.rope_theta and model.init_std must be positive")

        return p


@dataclass
class TokenizerConfig:
    """A character-level or byte-level BPE tokenizer trained on the corpus, or an existing tokenizer.json."""

    kind: Literal["char", "bpe"] = "char"
    vocab_size: int = 4096  # bpe only: total size including special tokens
    path: Optional[str] = None  # an existing tokenizer.json; then nothing is trained
    train_chars: int = 2_000_000_000  # bpe: it learns from at most this many characters (a seeded sample)

    def check(self, cfg: "Config") -> list[str]:
        """A tokenizer that cannot be trained."""
        p: list[str] = []
        if self.train_chars < 1:
            p.append(f"tokenizer.train_chars: must be positive (got {self.train_chars})")
        if self.kind == "bpe" and self.vocab_size < 260:
            p.append(f"tokenizer.vocab_size: a byte-level BPE needs at least 260 tokens (got {self.vocab_size})")

        return p


@dataclass
class DataConfig:
    """Where the text comes from and how it is split; see README "Data"."""

    path: Optional[str] = None  # file, folder, hf:NAME or https:// URL
    sha256: Optional[str] = None  # expected checksum of a downloaded URL
    text_column: str = "text"  # for .jsonl/.json/.csv/.tsv/.parquet/hub data
    label_column: str = "label"  # classification finetuning
    hf_config: Optional[str] = None  # hub dataset configuration name
    hf_split: str = "train"
    val_path: Optional[str] = None  # a separate validation source; otherwise the tail of path
    val_fraction: float = 0.1  # the last fraction of tokens is the validation split
    hf_revision: Optional[str] = None  # hub dataset revision (a commit or tag); part of the cache key
    cache_dir: str = field(default_factory=default_cache_dir)
    num_proc: int = 0  # threads the tokenizer uses while preparing; 0 = all CPU cores
    # tokens per cache shard (closed at the first piece of text past it): a killed preparation resumes from the last
    shard_tokens: int = 1 << 24

    def check(self, cfg: "Config") -> list[str]:
        """Impossible split and source settings."""
        d = self
        p: list[str] = []
        if not 0.0 <= d.val_fraction < 1.0:
            p.append(f"data.val_fraction: must be in [0, 1) (got {d.val_fraction})")
        if d.num_proc < 0:
            p.append(f"data.num_proc: must be 0 (auto) or more (got {d.num_proc})")
        if d.shard_tokens < 1024:
            p.append(f"data.shard_tokens: must be at least 1024 (got {d.shard_tokens})")
        if d.sha256 is not None and (len(d.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in d.sha256)):
            p.append("data.sha256: must be 64 hexadecimal characters")

        return p


@dataclass
class TrainConfig:
    """The training loop: optimizer, schedule, precision, logging and checkpoints."""

    batch_size: int = 12  # per-device micro-batch (sequences)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: Optional[float] = None  # floor of the cosine decay; None: lr / 10
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    eval_interval: int = 250  # steps between validation passes; 0 = only at the end
    eval_batches: Optional[int] = None  # None: one full pass over the validation split
    log_interval: int = 10
    save_interval: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2  # step checkpoints kept (the newest ones)
    keep_best: bool = True  # also save at a new best `best_metric` and keep that checkpoint
    best_metric: str = "val_loss"  # an evaluation metric (val_loss; accuracy or f1 for classification)
    best_mode: Literal["auto", "min", "max"] = "auto"  # auto: max for accuracy/f1/precision/recall, else min
    skip_nonfinite: int = 0  # steps with a NaN/inf loss or gradient that may be skipped before stopping (exit 3)
    patience: int = 0  # early stopping: evaluations without a new best before stopping; 0 = never stop early
    # scaling out (README "Scaling out"); parallel and dist_timeout apply only under torchrun
    global_batch_size: Optional[int] = None  # sequences per step over all ranks; grad_accum is then derived
    # replicate the model (ddp), shard it (fsdp: FSDP2 fully_shard), split its layers over the ranks (tp: tensor
    # parallel), or both on a 2-D mesh (fsdp_tp: tensor-parallel groups of tp_size ranks, FSDP across them)
    parallel: Literal["ddp", "fsdp", "tp", "fsdp_tp"] = "ddp"
    tp_size: Optional[int] = None  # ranks per tensor-parallel group; None: all ranks for tp (fsdp_tp needs it)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    dist_timeout: float = 300.0  # seconds a collective waits for the other ranks before failing
    allow_oversubscribe: bool = False  # start even when the memory estimate exceeds the device's memory
    log: list[Literal["tensorboard"]] = field(default_factory=list)  # extra metric sinks besides metrics.jsonl

    def check(self, cfg: "Config") -> list[str]:
        """Impossible loop settings (adjustments of merely odd ones are `adjust`'s)."""
        t = self
        p: list[str] = []
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval"):
            if getattr(t, name) < 1:
                p.append(f"train.{name}: must be at least 1 (got {getattr(t, name)})")
        for name in ("warmup_steps", "eval_interval", "save_interval", "weight_decay", "grad_clip"):
            if getattr(t, name) < 0:
                p.append(f"train.{name}: must not be negative (got {getattr(t, name)})")
        if t.lr <= 0:
            p.append(f"train.lr: must be positive (got {t.lr})")
        if t.min_lr is not None and t.min_lr < 0:
            p.append(f"train.min_lr: must not be negative (got {t.min_lr})")
        if t.skip_nonfinite < 0:
            p.append(f"train.skip_nonfinite: must not be negative (got {t.skip_nonfinite})")
        if t.global_batch_size is not None:
            if t.global_batch_size < 1:
                p.append(f"train.global_batch_size: must be at least 1 (got {t.global_batch_size})")
            elif t.grad_accum != 1:
                p.append("train.global_batch_size and train.grad_accum are both set; set only one "
                         "(with global_batch_size, grad_accum = global_batch_size / (batch_size x processes))")
            elif t.batch_size >= 1 and t.global_batch_size % t.batch_size:
                p.append(f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                         f"train.batch_size={t.batch_size}")
        if t.dist_timeout <= 0:
            p.append(f"train.dist_timeout: must be positive seconds (got {t.dist_timeout})")
        if t.tp_size is not None and t.tp_size < 1:
            p.append(f"train.tp_size: must be a positive number of processes (got {t.tp_size})")
        if t.tp_size is not None and t.tp_size > 1 and t.parallel not in ("tp", "fsdp_tp"):
            p.append(f"train.tp_size={t.tp_size} applies to train.parallel=tp or fsdp_tp, not {t.parallel}; "
                     "set one of them")
        if t.keep_last < 1:
            p.append(f"train.keep_last: must be at least 1 (got {t.keep_last})")
        if t.eval_batches is not None and t.eval_batches < 1:
            p.append(f"train.eval_batches: must be at least 1, or null for a full pass (got {t.eval_batches})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                p.append(f"train.{name}: must be in [0, 1) (got {getattr(t, name)})")
        if t.eps <= 0:
            p.append(f"train.eps: must be positive (got {t.eps})")

        if t.patience < 0:
            p.append(f"train.patience: must not be negative (got {t.patience})")
        return p

    def adjust(self) -> list[str]:
        """Odd but workable values, set to what they can only mean; one warning each."""
        t, warnings = self, []
        if t.warmup_steps > t.max_steps:
            warnings.append(f"train.warmup_steps={t.warmup_steps} is longer than train.max_steps={t.max_steps}; "
                            f"clamped to {t.max_steps}")
            t.warmup_steps = t.max_steps
        if t.min_lr is not None and t.min_lr > t.lr:
            warnings.append(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; clamped to {t.lr}")
            t.min_lr = t.lr
        if t.eval_interval > t.max_steps:
            warnings.append(f"train.eval_interval={t.eval_interval} exceeds train.max_steps; "
                            "validation runs only at the end")
            t.eval_interval = 0
        return warnings


@dataclass
class GenerateConfig:
    """How `llmctl infer` and `serve` generate (flags such as --temperature are shorthand for these keys). The
    sampling keys mean the same and follow the same rules everywhere: llmctl.sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = 200  # 0, -1 or null: no limit
    top_p: Optional[float] = None
    seed: Optional[int] = None
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these (sampling.MAX_STOPS)
    dtype: Literal[INFER_DTYPES] = "auto"  # auto: see README "Inference speed"
    quantize: Literal[QUANTIZE_MODES] = "auto"
    # the decode step compiled ahead of time (llmctl.aot): auto = use it when cached, true = build it if missing
    compile: Literal["auto", True, False] = "auto"
    batch_size: int = 8  # prompts decoded together by `infer --input`

    def check(self, cfg: "Config") -> list[str]:
        """Impossible generation settings: the sampling keys by llmctl.sampling's rules."""
        values = {f: getattr(self, f) for f in sampling.FIELDS}
        p = [f"generate.{x.field}: {x.message}" for x in sampling.problems(values)]
        if self.batch_size < 1:
            p.append(f"generate.batch_size: must be at least 1 (got {self.batch_size})")
        return p


@dataclass
class EvalConfig:
    """`llmctl eval` settings."""

    batch_size: int = 16
    text_column: Optional[str] = None  # columns of the file given to `eval --data`; None: data.text_column
    label_column: Optional[str] = None  # None: data.label_column

    def check(self, cfg: "Config") -> list[str]:
        """Impossible evaluation settings."""
        p: list[str] = []
        if self.batch_size < 1:
            p.append(f"eval.batch_size: must be at least 1 (got {self.batch_size})")
        return p


@dataclass
class ServeConfig:
    """`llmctl serve` settings (README "Serve")."""

    slots: int = 16  # requests decoded together (continuous batching): the KV cache holds this many sequences
    max_queue: int = 256  # requests waiting for a slot; one more is refused with 429 and Retry-After
    max_tokens: int = 4096  # the most new tokens one request may ask for (more: 400)
    max_body_bytes: int = 1 << 20  # larger request bodies are refused with 413
    request_timeout: float = 600.0  # seconds from arrival to the last token; then the request ends with 504
    drain_timeout: float = 30.0  # seconds a SIGTERM/SIGINT waits for requests in flight before exiting
    model_name: Optional[str] = None  # the model's id in the API; None: the run directory's name

    def check(self, cfg: "Config") -> list[str]:
        """Impossible serving settings."""
        p: list[str] = []
        for name in ("slots", "max_queue", "max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                p.append(f"serve.{name}: must be at least 1 (got {getattr(self, name)})")
        for name in ("request_timeout", "drain_timeout"):
            if getattr(self, name) <= 0:
                p.append(f"serve.{name}: must be a positive number of seconds (got {getattr(self, name)})")
        if self.model_name is not None and not self.model_name.strip():
            p.append("serve.model_name: must not be empty (or null for the run directory's name)")
        return p


@dataclass
class FinetuneConfig:
    """What `llmctl finetune` trains: the task, the method, and what stays frozen."""

    task: Literal["lm", "classification", "instruct", "distill"] = "lm"
    method: Literal["full", "lora"] = "full"
    labels: Optional[list[str]] = None  # classification: label names in order; None: sorted values in the data
    pooling: Literal["last", "mean"] = "last"  # classification: the final <eos> state, or the mean over the text
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    freeze_embeddings: bool = False
    freeze_blocks: int = 0  # freeze the first N Transformer blocks
    # instruction tuning: field names of the three accepted JSONL layouts (detected per row)
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    instances_field: str = "instances"  # seed_tasks.jsonl: a list of {input, output} per instruction
    prompt_field: str = "prompt"
    response_field: str = "response"
    prompt_template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    prompt_template_no_input: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    packing: bool = False  # instruct: pack examples into full blocks instead of padding each batch
    # distill: the student learns the teacher's next-token distributions on the corpus (README "Compression")
    teacher: Optional[str] = None  # a run directory or checkpoint sharing the student's tokenizer
    distill_alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy
    distill_temperature: float = 1.0  # T: both distributions are softened by it

    def check(self, cfg: "Config") -> list[str]:
        """Impossible finetuning settings (freeze_blocks against cfg.model)."""
        f, m = self, cfg.model
        p: list[str] = []
        if f.lora_rank < 1 or f.lora_alpha <= 0 or not 0.0 <= f.lora_dropout < 1.0:
            p.append("finetune.lora_rank must be at least 1, lora_alpha positive and lora_dropout in [0, 1)")
        if f.method == "lora" and not f.lora_targets:
            p.append("finetune.lora_targets: name at least one layer (attn.qkv, attn.proj, mlp.fc, mlp.proj, wte)")
        if f.freeze_blocks < 0 or (m.n_layer >= 1 and f.freeze_blocks > m.n_layer):
            p.append(f"finetune.freeze_blocks: must be between 0 and model.n_layer={m.n_layer} (got {f.freeze_blocks})")
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
        for name in ("prompt_template", "prompt_template_no_input"):
            if "{instruction}" not in getattr(f, name):
                p.append(f"finetune.{name}: must contain {{instruction}}")
        return p


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    warnings: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in sections(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def sections(cfg: Any) -> list:
    """The section fields of a config (everything but bookkeeping)."""
    return [f for f in dataclasses.fields(cfg) if f.name != "warnings"]


# --------------------------------------------------------------------------------------------------------------
# Type checking and coercion of raw (YAML / --set) values


def _coerce(value: Any, tp: Any) -> tuple[Any, Optional[str]]:
    """Return (converted value, None) or (None, reason) for a value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None, None
        reasons = []
        for a in args:
            if a is type(None):
                continue
            v, why = _coerce(value, a)
            if why is None:
                return v, None
            reasons.append(why)
        return None, reasons[0] if reasons else "must be null"
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and True in choices and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            value = value.lower() in ("true", "yes", "on")  # a Literal that also takes true/false (`--set k=false`)
        if value in choices:
            return value, None
        names = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]
        return None, f"must be one of {', '.join(names)} (got {value!r})"
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return None, f"must be a list (got {value!r})"
        out = []
        for v in value:
            c, why = _coerce(v, inner)
            if why:
                return None, why
            out.append(c)
        return out, None
    if tp is Any:
        return value, None
    if tp is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on"), None
        return None, f"must be true or false (got {value!r})"
    if tp is int:
        if isinstance(value, bool):
            return None, f"must be an integer (got {value!r})"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f), None
            except ValueError:
                pass
        return None, f"must be an integer (got {value!r})"
    if tp is float:
        if isinstance(value, bool):
            return None, f"must be a number (got {value!r})"
        if isinstance(value, (int, float)):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value), None
            except ValueError:
                pass
        return None, f"must be a number (got {value!r})"
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value), None
        return None, f"must be a string (got {value!r})"
    if tp is dict:
        if isinstance(value, dict):
            return value, None
        return None, f"must be a mapping (got {value!r})"
    return value, None


# A section written with nothing under it (`model:`, `model: null`, or every key commented out) is an error, the
# same one wherever it comes from (config show, pretrain, finetune; with or without --set model.* given too):
# null is never "the default" for a key (`train.lr: null` is an error too), so an empty section is more likely a
# half-deleted one than a wish for defaults, and the fix is one line either way. Before, a --set for that section
# silently replaced the null (so pretrain accepted what config show refused).
EMPTY_SECTION = "is empty (null); give it keys, or remove the line"


def _merge_section(obj: Any, raw: dict, prefix: str, problems: list[str]) -> None:
    """Set the fields of dataclass `obj` from `raw`, recording unknown keys and bad types."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "warnings"]
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            problems.append(f"{where}: unknown key{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                problems.append(f"{where}: {EMPTY_SECTION}")  # (from --set {key}=null or a dict)
                continue
            if not isinstance(value, dict):
                problems.append(f"{where}: must be a mapping of {key} settings (got {value!r})")
                continue
            _merge_section(getattr(obj, key), value, f"{where}.", problems)
            continue
        converted, why = _coerce(value, tp)
        if why:
            problems.append(f"{where}: {why}")
        else:
            setattr(obj, key, converted)


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ['train.lr=3e-4', 'model.n_layer=2'] into a nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=3e-4")
            continue
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            problems.append(f"--set {item!r}: the key must be dotted, for example train.lr")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        d = nested
        parts = key.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {})
            if not isinstance(d, dict):
                problems.append(f"--set {item!r}: {part} is set both as a value and as a section")
                break
        else:
            d[parts[-1]] = value
    if problems:
        raise LlmctlError(_format_problems(problems))
    return nested


def merge_settings(base: dict, extra: dict) -> dict:
    """Raw settings `extra` layered over `base` (nested sections merged key by key): the one way configs stack."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_settings(out[k], v)
        else:
            out[k] = v
    return out


def user_settings(path: str | Path | None, overrides: list[str] | None) -> dict:
    """What the user asked for, as raw settings: the YAML file, then the `--set` overrides over it."""
    return merge_settings(read_yaml(path) if path is not None else {}, parse_overrides(overrides))


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning every failure into one clear LlmctlError."""
    p = Path(path)
    if not p.exists():
        raise LlmctlError(f"config file not found: {p} (check the path given to -c/--config)")
    if p.is_dir():
        raise LlmctlError(f"config path is a directory, not a YAML file: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LlmctlError(f"config file {p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise LlmctlError(f"config file {p} is not UTF-8 text") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LlmctlError(f"config file {p} must be a mapping of sections (model:, train:, ...), "
                          f"not {type(raw).__name__}")
    # sections are checked here, before a --set for one can be merged over a null or a scalar (see EMPTY_SECTION)
    names = {f.name for f in sections(Config)}
    bad = [f"{k}: in {p} {EMPTY_SECTION}" if v is None else f"{k}: in {p} must be a mapping of {k} settings (got {v!r})"
           for k, v in raw.items() if k in names and not isinstance(v, dict)]
    if bad:
        raise LlmctlError(_format_problems(bad))
    return raw


def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"bad config: {problems[0]}"
    return f"bad config ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems)


def from_dict(raw: dict, *, validate: bool = True, cls: type = None) -> Config:
    """Build a Config from a nested dict (defaults fill the rest) and check it."""
    cfg = (cls or Config)()
    problems: list[str] = []
    _merge_section(cfg, raw, "", problems)
    if validate:
        problems += _check_values(cfg)
    if problems:
        raise LlmctlError(_format_problems(problems))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults <- `base` (for example a checkpoint's config) <- YAML file <- `--set` overrides."""
    return from_dict(merge_settings(dict(base or {}), user_settings(path, overrides)))


# --------------------------------------------------------------------------------------------------------------
# Value checks: impossible values are errors, odd ones are adjusted with a warning


def _check_values(cfg: Config) -> list[str]:
    """Every section's own check (each lives beside its fields); merely odd values are adjusted with a warning
    once the whole config is valid."""
    problems = [p for f in sections(cfg) for p in getattr(cfg, f.name).check(cfg)]
    if not problems:  # adjustments only make sense on an otherwise valid config
        cfg.warnings += cfg.train.adjust()
    return problems
