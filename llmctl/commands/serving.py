"""serve: load a checkpoint, bind the address, and answer the OpenAI API until a signal drains the server."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable, Optional

from ..config import Config
from ..errors import EXIT_SIGINT, EXIT_SIGTERM, LlmctlError
from ..events import SILENT, Events
from ..fileio import read_text
from ..interrupt import NAMES
from ..loading import Loaded, apply_settings, for_inference, load_model
from ..prefix_cache import PrefixCache
from ..sampling import Sampling

SECTIONS = ("serve", "generate")  # what -c/--set may change for a server (the model itself is the checkpoint's)
KEY_ENV = "LLMCTL_API_KEY"


def require_extra() -> None:
    """Exit 2 with one line when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LlmctlError(f"llmctl serve needs the serve extra ({e.name} is not installed): "
                          "pip install 'llmctl[serve]'") from None


def api_key(key_file: Optional[Path]) -> Optional[str]:
    """The key from --api-key-file (its first line), else $LLMCTL_API_KEY, else None."""
    if key_file is not None:
        lines = read_text(Path(key_file), "--api-key-file").strip().splitlines()
        if not lines or not lines[0].strip():
            raise LlmctlError(f"--api-key-file {key_file} is empty; put the key on its first line")
        return lines[0].strip()
    return os.environ.get(KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings(loaded: Loaded, config: Optional[Path], overrides: list[str], flags: Optional[dict] = None
             ) -> tuple[Config, Sampling]:
    """The checkpoint's config with the user's serve.* and generate.* settings over it (others are refused), and
    the sampling settings every request starts from: generate.*, then the sampling flags (field -> value, None =
    not given; shorthand for the same keys, checked under their own names)."""
    cfg = apply_settings(loaded, config, overrides, SECTIONS, "serve")
    return cfg, Sampling.from_config(cfg.generate, flags)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear error (port in use, address not on this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LlmctlError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LlmctlError(f"port {port} on {host} is in use; stop what is listening there or pick another "
                              "with --port") from None
        if e.errno == errno.EACCES:
            raise LlmctlError(f"no permission to listen on port {port}; use a port above 1023") from None
        raise LlmctlError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    return sock


def serve(ckpt: Path, host: str = "127.0.0.1", port: int = 8000, api_key_file: Optional[Path] = None,
          config: Optional[Path] = None, overrides: Optional[list[str]] = None, dtype: Optional[str] = None,
          quantize_mode: Optional[str] = None, compile: Optional[bool] = None, device: str = "auto",
          base: Optional[Path] = None, tokenizer: Optional[Path] = None, insecure: bool = False,
          events: Events = SILENT, on_ready: Optional[Callable[[dict], None]] = None, flags: Optional[dict] = None,
          draft: Optional[str] = None) -> int:
    """Serve `ckpt` until SIGTERM/SIGINT: the first signal stops accepting and finishes the requests in flight
    (within serve.drain_timeout), then returns 0; a second one exits at once (130 or 143). `events` hears about
    compiling, draining and stopping; `on_ready` gets the address and model once the server listens (a result:
    `serve --json` prints it on stdout). `dtype`, `quantize_mode`, `compile`, `draft` and the sampling `flags`
    are shorthand for their generate.* keys (None: not given)."""
    require_extra()
    key = api_key(api_key_file)
    if not is_loopback(host) and key is None and not insecure:
        raise LlmctlError(f"--host {host} is reachable from other machines, and no API key is set: give "
                          f"--api-key-file FILE or ${KEY_ENV} (or --insecure to serve without one)")
    if port < 0 or port > 65535:
        raise LlmctlError(f"--port must be between 0 and 65535 (got {port})")
    loaded = load_model(ckpt, device, base=base, tokenizer=tokenizer)
    cfg, defaults = settings(loaded, config, overrides or [], flags)
    sock = bind(host, port)  # before the slow part: a port in use is reported at once
    try:
        return _run(loaded, cfg, defaults, sock, key, dtype, quantize_mode, compile, events, on_ready, draft)
    finally:
        sock.close()


def _run(loaded: Loaded, cfg: Config, defaults: Sampling, sock: socket.socket, key: Optional[str],
         dtype: Optional[str], quantize_mode: Optional[str], compile: Optional[bool], events: Events,
         on_ready: Optional[Callable[[dict], None]], draft: Optional[str] = None) -> int:
    import uvicorn

    from .. import openai_api as api
    from .. import server
    from .inference import classify_texts, speculation

    sc = cfg.serve
    name = sc.model_name or loaded.ckpt.run_dir.name
    metrics = server.server_metrics()
    limits = api.Limits(cfg.model.block_size, sc.max_tokens, defaults, sc.slots, cfg.model.vocab_size)
    served = server.Served(name, loaded.tokenizer, cfg, limits)
    spec = None
    if loaded.classifier is not None:
        if draft:
            raise LlmctlError("--draft: this checkpoint is a classifier (it answers /v1/classify and generates "
                              "nothing to draft); drop --draft")
        served.classify = lambda texts: classify_texts(loaded, texts, batch_size=cfg.eval.batch_size)
    else:
        for_inference(loaded, dtype, quantize_mode, compile, events=events)
        spec = speculation(loaded, draft, dtype, quantize_mode)
        if sc.prefix_cache:
            loaded.engine.prefix = PrefixCache(sc.prefix_cache_mib << 20)
        served.worker = server.Worker(loaded.engine, sc.slots, sc.max_queue, sc.request_timeout, metrics,
                                      events.warn, spec)
        served.worker.start()  # (loads, or with --compile builds, the compiled step of the serving shape)
    app = server.create_app(served, key, sc.max_body_bytes, metrics)
    uv = _server_class()(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=sc.drain_timeout, timeout_keep_alive=30))

    def draining() -> None:
        served.draining = True
        w = served.worker
        busy = (w.engine.busy + len(w.engine.waiting)) if w else 0
        events.log(f"stopping: finishing {busy} request(s) in flight (up to serve.drain_timeout="
                   f"{sc.drain_timeout:g} s); a second signal exits at once")

    uv.on_first_signal = draining
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    info = {"url": f"http://{shown}:{port}", "model": name, "host": host, "port": port,
            "slots": sc.slots if served.worker else 0, "kind": "classifier" if served.classify else "lm",
            "precision": loaded.precision, "compiled": bool(served.worker and served.worker.engine.compiled),
            "api_key": key is not None, "draft": spec.name if spec else None}
    if on_ready:
        on_ready(info)
    try:
        uv.run(sockets=[sock])
    finally:
        if served.worker is not None:
            served.worker.stop()
    if uv.forced_by is not None:
        raise LlmctlError(f"stopped at once by a second {NAMES.get(uv.forced_by, 'signal')}; requests in flight "
                          "were cut off", EXIT_SIGINT if uv.forced_by == signal.SIGINT else EXIT_SIGTERM)
    events.log("stopped")
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with llmctl's signal rule: the first SIGINT or SIGTERM drains, a second one of either
        exits at once; no signal is raised again after shutdown (a drained server exits 0)."""

        on_first_signal: Callable[[], None] = staticmethod(lambda: None)
        forced_by: Optional[int] = None

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit, self.forced_by = True, sig
                # the requests cut off are cancelled tasks, which uvicorn would log with a traceback each
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
                return
            self.should_exit = True
            self.on_first_signal()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in NAMES}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server
