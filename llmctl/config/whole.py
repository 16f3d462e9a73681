"""What a section's `check(cfg)` receives: the whole configuration, for rules that span sections (a LoRA rank
against the model's width, a serve limit against the context).

It is `config.root.Config`; the name is typed loosely here so that the section modules stay below `root`, which
imports them to build `Config` (importing it back, even for type hints only, would make a cycle).
"""

from typing import Any

Whole = Any  # config.root.Config
