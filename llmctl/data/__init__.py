"""Text in, batches out: tables of examples, the token cache, language-modelling batches, supervised examples.

One job per module, each importing only those above it in this list (never one below, so no cycles):
  tables      whole files of examples read through `datasets`, their columns checked
  streaming   one source read, tokenized on all cores and written shard by shard into a build folder
  cache       the token cache: a corpus tokenized once (through `streaming`) and found again by its key
  batches     random training blocks and evaluation blocks over a token sequence
  conversations  chat SFT rows (`messages`, `conversations`): rendered whole, labelled on the assistant turns
  examples    classification rows and instruction pairs (read through `tables`) tokenized, split and batched
  preferences  preference pairs (DPO: prompt, chosen, rejected) as text or conversations, cut to the context
  prompts     prompt rows (GRPO, `eval --reward`): a prompt as text or messages, and the row's other columns
None imports torch at its top, so `llmctl prepare` starts without it: only the functions that make tensors do.
This file hands on the names the rest of llmctl uses.
"""

from ..corpus import resolve_source
from .batches import LMBatches, eval_blocks
from .cache import TokenData, document_starts, prepare, tokenize_file
from .conversations import chat_examples
from .examples import (
    ExampleBatches,
    Examples,
    classification_examples,
    classification_ids,
    eval_batches,
    holdout,
    instruct_examples,
    packed_tokens,
    pad_batch,
)
from .preferences import preference_examples
from .prompts import PromptRow, prompt_rows
from .tables import load_texts

__all__ = [
    "ExampleBatches", "Examples", "LMBatches", "PromptRow", "TokenData", "chat_examples", "classification_examples",
    "classification_ids", "document_starts", "eval_batches", "eval_blocks", "holdout", "instruct_examples",
    "load_texts", "packed_tokens", "pad_batch", "preference_examples", "prepare", "prompt_rows", "resolve_source",
    "tokenize_file",
]
