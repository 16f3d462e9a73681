"""Ahead-of-time compiled decode steps: built once per model, precision and shape, then loaded in well under a second.

The decode step (one token per row against the static KV cache) is exported with `torch.export`, compiled by
AOTInductor into a shared library and packaged as a `.pt2` file under llmctl's cache directory. Later runs of the
same weights and shape load that file through the C++ package loader (no Python-side recompilation, no dynamo
guards), so even a short generation gains from it. The KV cache tensors are inputs of the compiled step, which
writes the new keys and values into them in place; prefill stays eager and writes into the same tensors.

Packages are keyed by everything they bake in: the weights themselves (constants of the library; on a CPU also
pre-packed for the GEMM kernels), the model config, the batch size and cache length, the dtype, the torch version
and the CPU's instruction set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .errors import LlmctlError
from .events import SILENT, Events
from .fileio import atomic_path
from .model import KVCache, Transformer

FORMAT = 2  # bump when the exported step's inputs or outputs change


class _Step(nn.Module):
    """One decode step with the cache tensors as explicit inputs (mutated in place)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tok, pos, caches):
        # tok (S, 1), pos (S,) each slot's position, caches [k0, v0, k1, v1, ...] each (S, nkv, L, hd)
        return self.model(tok, cache=KVCache.of(caches), pos=pos)[:, -1]  # (S, V)


def inductor_options(device_type: str) -> dict:
    """Inductor settings for the decode step. On a CPU: weight freezing (weights become constants that inductor
    pre-packs) and its C++ GEMM templates, which read the weights at close to memory bandwidth where torch's default
    matrix-vector kernels reach a fraction of it. The templates are the only GEMM choice: autotuning them against
    aten picked them for every matmul and only doubled the build time (docs/results.md#inference-speed)."""
    if device_type != "cpu":
        return {}
    return dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP",
                autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)


def configure_compile_cache() -> None:
    """Keep inductor's own caches (autotune results, built kernels) in llmctl's cache so rebuilds are quicker."""
    from .config import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(default_cache_dir()) / "inductor"))


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}-{torch.version.cuda}"
    return f"{device.type}-{torch.backends.cpu.get_cpu_capability()}"


def shape_key(model: Transformer, batch: int, length: int) -> str:
    """What a package depends on besides the weight values: code format, torch, device, config, shape, dtype."""
    p = model.wte.weight
    desc = dict(format=FORMAT, torch=torch.__version__, device=_device_tag(p.device), batch=batch, length=length,
                dtype=str(p.dtype), config=dataclasses.asdict(model.cfg),
                layers=sorted({type(m).__name__ for m in model.modules()}))
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def weights_digest(model: Transformer) -> str:
    """sha256 over the names and bytes of every parameter and persistent buffer (about 1 GB/s)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


class CompiledStep:
    """A loaded package: call it like the decode step, with the flat list of cache tensors [k0, v0, k1, v1, ...]."""

    def __init__(self, path: Path, device: torch.device):
        index = -1 if device.type == "cpu" else (device.index if device.index is not None
                                                 else torch.cuda.current_device())
        # the C++ loader directly: torch._inductor's Python wrapper would add ~1.3 s of imports to every run
        try:
            self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        except TypeError:  # torch before 2.7: no runner count or device index
            self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False)
        self.path = path

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        return self._loader.boxed_run([tok, pos, *caches])[0]  # (S, V)


def exportable(model: nn.Module) -> bool:
    """Whether the model's decode step can be exported: not with the CPU's dynamic int8 layers (fbgemm's packed
    weights are opaque to torch.export)."""
    return not any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def supported() -> bool:
    """Whether this torch build can load AOTInductor packages (torch 2.6 and later, CPU and CUDA builds)."""
    return hasattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader")


def build(model: Transformer, batch: int, length: int, path: Path) -> None:
    """Export the decode step of `model` for (batch, length) and compile it into the package `path` (atomically)."""
    configure_compile_cache()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".pt2") as tmp:  # (the packager wants a .pt2 name)
            _compile(model, batch, length, tmp)
    except Exception as e:  # a missing C++ compiler, an op export or inductor cannot handle, ...
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise LlmctlError(f"could not compile the decode step ({type(e).__name__}: {first}); run with --no-compile "
                          "(on a CPU, inductor also needs a working C++ compiler)") from e


def _compile(model: Transformer, batch: int, length: int, package: Path) -> None:
    p = model.wte.weight
    # (generation runs under inference_mode, whose tensors export cannot trace in-place updates of)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # raised inside inductor's autotuner
        caches = KVCache.empty(model.cfg, batch, length, p.dtype, p.device).flat()
        args = (torch.zeros(batch, 1, dtype=torch.long, device=p.device),
                torch.zeros(batch, dtype=torch.long, device=p.device), caches)
        program = torch.export.export(_Step(model), args, strict=False)
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(program, package_path=str(package), inductor_configs=inductor_options(p.device.type))


class StepStore:
    """Finds, loads and (when asked) builds the compiled decode steps of one model, by (batch, cache length)."""

    def __init__(self, model: Transformer, root: Optional[Path] = None, events: Events = SILENT):
        from .config import default_cache_dir

        self.model = model
        self.root = Path(root) if root is not None else Path(default_cache_dir()) / "compiled"
        self.events = events
        self._digest: Optional[str] = None
        self._loaded: dict[tuple[int, int], CompiledStep] = {}
        self.builds = 0  # packages built by this store (tests and benchmarks read it)

    def path(self, batch: int, length: int, digest: Optional[str] = None) -> Path:
        return self.root / shape_key(self.model, batch, length) / f"{digest or self.digest()}.pt2"

    def digest(self) -> str:
        if self._digest is None:
            self._digest = weights_digest(self.model)
        return self._digest

    def get(self, batch: int, length: int, build_missing: bool) -> Optional[CompiledStep]:
        """The compiled step for this shape: loaded from the cache, else built if `build_missing`, else None."""
        if (batch, length) in self._loaded:
            return self._loaded[(batch, length)]
        if not supported():
            if build_missing:
                raise LlmctlError(f"this torch build ({torch.__version__}) cannot load compiled packages; "
                                  "run with --no-compile")
            return None
        if not build_missing and not (self.root / shape_key(self.model, batch, length)).is_dir():
            return None  # nothing of this shape was ever built: skip hashing the weights
        path = self.path(batch, length)
        step = None
        if path.is_file():
            try:
                step = CompiledStep(path, self.model.wte.weight.device)
            except Exception:  # a truncated or foreign file: it is only a cache, drop it
                path.unlink(missing_ok=True)
                self.events.log(f"dropped an unreadable compiled decode step from the cache ({path})")
        if step is None and build_missing:
            self.events.log(f"compiling the decode step for batch {batch} and {length} cache slots: once per "
                            "model, precision and shape (half a minute to a minute on a CPU); later runs load it "
                            "from the cache")
            start = time.perf_counter()
            build(self.model, batch, length, path)
            self.builds += 1
            self.events.log(f"compiled in {time.perf_counter() - start:.0f} s")
            step = CompiledStep(path, self.model.wte.weight.device)
        if step is not None:
            self._loaded[(batch, length)] = step
        return step

