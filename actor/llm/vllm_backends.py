"""vLLM backends of :class:`actor.llm.engine.VllmEngine`: how one engine is started, asked to
generate, reloaded, health-checked and stopped.

- :class:`InProcessBackend`: ``vllm.LLM`` in this process; vLLM runs its EngineCore and worker as
  child processes (spawned: callers' scripts need an ``if __name__ == "__main__":`` guard).
- :class:`ServerBackend`: ``python -m vllm.entrypoints.openai.api_server`` as a subprocess (its own
  session), generation through ``/v1/completions`` with token ids in and out, reloads through the
  dev endpoints ``/collective_rpc`` and ``/reset_prefix_cache`` (``VLLM_SERVER_DEV_MODE=1``).
- :class:`FleetloopWorkerExtension` is mixed into vLLM's worker (``worker_extension_cls``): its
  ``fleetloop_reload_weights`` calls vLLM's own ``Worker.reload_weights(weights_path=...)``.

Both backends record the pids of the processes they started and stop exactly those. Neither
enforces deadlines on reloads: the engine does (it runs ``reload`` in a thread it can abandon).
Each ``generate`` returns, per prompt, ``(token_ids, logprobs, text, finish_reason)`` per completion.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetloop.errors import Unavailable
from fleetloop.logs import event, get_logger

if TYPE_CHECKING:  # pragma: no cover
    from actor.llm.engine import EngineConfig

log = get_logger("actor.llm.vllm")

EXTENSION_CLS = "actor.llm.vllm_backends.FleetloopWorkerExtension"
RELOAD_RPC = "fleetloop_reload_weights"
RawSample = tuple[list[int], list[float], str, str]


class FleetloopWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); reached through ``collective_rpc``."""

    def fleetloop_reload_weights(self, weights_path: str, delay_s: float | str = 0.0) -> dict:
        """vLLM's in-place reload from a folder of safetensors. ``delay_s`` is a fault-injection hook
        for tests (a slow update)."""
        if float(delay_s) > 0:
            time.sleep(float(delay_s))
        t0 = time.perf_counter()
        self.reload_weights(weights_path=str(weights_path))  # type: ignore[attr-defined]
        return {"seconds": time.perf_counter() - t0}

    def fleetloop_weight_checksum(self) -> float:
        """Sum of all parameters (a cheap fingerprint for tests)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return float(sum(p.detach().double().sum().item() for p in model.parameters()))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stop_processes(top: list[int], pids: list[int], grace_s: float = 15.0) -> None:
    """Stop processes this engine started: SIGTERM the top-level ones (they shut their children down
    and unlink their shared memory), wait up to ``grace_s`` for all of ``pids``, SIGKILL the rest.

    Killing children first, or everything at once, would leak vLLM's shared-memory ring buffers
    (``/dev/shm/psm_*``, 160 MiB each): their owner and Python's resource tracker must outlive them."""
    import psutil

    procs = []
    for pid in dict.fromkeys(pids + top):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        if p.pid in top:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5.0)


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _vital(pids: list[int]) -> list[int]:
    """``pids`` without helper processes (Python's multiprocessing resource tracker): the ones whose
    death means the engine is dead."""
    import psutil

    out = []
    for pid in pids:
        try:
            if "resource_tracker" in " ".join(psutil.Process(pid).cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(pid)
    return out


def _vllm_env(cfg: "EngineConfig") -> dict[str, str]:
    return {
        "VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_threads_bind,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": str(cfg.cpu_reserved),
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
    }


class InProcessBackend:
    """``vllm.LLM`` in this process (EngineCore + worker are its child processes)."""

    def __init__(self, cfg: "EngineConfig") -> None:
        self.cfg = cfg
        self.llm: Any = None
        self.pids: list[int] = []  # the worker(s), then EngineCore (helpers like resource trackers left out)
        self.cores: list[int] = []

    def start(self) -> None:
        saved = {k: os.environ.get(k) for k in _vllm_env(self.cfg)}
        os.environ.update(_vllm_env(self.cfg))  # children inherit the environment at spawn
        try:
            from vllm import LLM

            c = self.cfg
            self.llm = LLM(model=c.model_dir, dtype=c.dtype, max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
                           seed=c.seed, enforce_eager=c.enforce_eager, enable_prefix_caching=c.enable_prefix_caching,
                           logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION_CLS)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        manager = self.llm.llm_engine.engine_core.resources.engine_manager
        self.cores = [p.pid for p in manager.processes] if manager is not None else []
        self.pids = _vital([d for pid in self.cores for d in _descendants(pid)] + self.cores)

    def alive(self) -> bool:
        if self.llm is None:
            return False
        if getattr(self.llm.llm_engine.engine_core.resources, "engine_dead", False):
            return False
        return all(_pid_alive(p) for p in self.pids)

    def generate(self, prompts: list[list[int]], params: list[Any]) -> list[list[RawSample]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [])]
                group.append((ids, lps, c.text, c.finish_reason or "length"))
            result.append(group)
        return result

    def reload(self, weights_path: str, delay_s: float) -> None:
        self.llm.collective_rpc(RELOAD_RPC, kwargs={"weights_path": weights_path, "delay_s": delay_s})
        self.llm.reset_prefix_cache()

    def checksum(self) -> float:
        return float(self.llm.collective_rpc("fleetloop_weight_checksum")[0])

    def close(self) -> None:
        pids, cores, llm = self.pids, self.cores, self.llm
        self.llm, self.pids, self.cores = None, [], []
        if llm is not None:  # vLLM's own shutdown first (SIGTERM to EngineCore, sockets closed), bounded

            def shutdown() -> None:
                try:
                    llm.llm_engine.engine_core.shutdown()
                except Exception as exc:  # noqa: BLE001 - the processes are stopped below anyway
                    event(log, "engine_shutdown_error", level=30, error=str(exc)[:200])

            t = threading.Thread(target=shutdown, name="vllm-shutdown", daemon=True)
            t.start()
            t.join(20.0)
        _stop_processes(cores, [d for c in cores for d in _descendants(c)] + pids)


class ServerBackend:
    """A supervised ``vllm.entrypoints.openai.api_server`` subprocess."""

    def __init__(self, cfg: "EngineConfig") -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.base = ""
        self.log_path: Path | None = None

    def start(self) -> None:
        import httpx

        c = self.cfg
        port = c.server_port or _free_port(c.server_host)
        self.base = f"http://{c.server_host}:{port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", c.model_dir, "--served-model-name", "policy",
               "--host", c.server_host, "--port", str(port), "--dtype", c.dtype, "--max-model-len", str(c.max_model_len),
               "--max-num-seqs", str(c.max_num_seqs), "--seed", str(c.seed), "--logprobs-mode", "processed_logprobs",
               "--worker-extension-cls", EXTENSION_CLS, "--disable-log-stats", "--disable-uvicorn-access-log"]
        cmd += ["--enforce-eager"] if c.enforce_eager else []
        cmd += ["--enable-prefix-caching"] if c.enable_prefix_caching else ["--no-enable-prefix-caching"]
        env = {**os.environ, **_vllm_env(c), "VLLM_SERVER_DEV_MODE": "1"}
        root = str(Path(__file__).resolve().parents[2])  # the worker imports EXTENSION_CLS from this checkout
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        fd, name = tempfile.mkstemp(prefix="fleetloop-vllm-server-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + c.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"vLLM server exited with {self.proc.returncode} during start-up; log: {self._tail()}",
                                  field="model_dir", value=c.model_dir)
            try:
                if httpx.get(self.base + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            self.close()
            raise Unavailable(f"vLLM server not healthy after {c.start_timeout_s}s", field="start_timeout_s", value=c.start_timeout_s)
        self.pids = _vital(_descendants(self.proc.pid)) + [self.proc.pid]  # EngineCore, worker(s), the server last

    def _tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and all(_pid_alive(p) for p in self.pids)

    def _post(self, path: str, body: dict | None, timeout: float | None) -> Any:
        import httpx

        try:
            r = httpx.post(self.base + path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise Unavailable(f"vLLM server {path} failed: {type(exc).__name__}: {exc}", field="path", value=path) from exc
        if r.status_code != 200:
            raise Unavailable(f"vLLM server {path} answered {r.status_code}: {r.text[:300]}", field="path", value=path)
        return r.json() if r.content else None

    def generate(self, prompts: list[list[int]], params: list[dict]) -> list[list[RawSample]]:
        from concurrent.futures import ThreadPoolExecutor

        def one(args: tuple[list[int], dict]) -> list[RawSample]:
            prompt, p = args
            body = {"model": "policy", "prompt": prompt, "logprobs": 0, "return_token_ids": True, **p}
            resp = self._post("/v1/completions", body, self.cfg.request_timeout_s)
            group = []
            for ch in sorted(resp["choices"], key=lambda ch: ch["index"]):
                ids = [int(t) for t in ch.get("token_ids") or []]
                lps = [float(x) for x in (ch.get("logprobs") or {}).get("token_logprobs") or []]
                group.append((ids, lps, ch.get("text", ""), ch.get("finish_reason") or "length"))
            return group

        with ThreadPoolExecutor(max_workers=min(32, len(prompts))) as pool:
            return list(pool.map(one, zip(prompts, params)))

    def reload(self, weights_path: str, delay_s: float) -> None:
        body = {"method": RELOAD_RPC, "kwargs": {"weights_path": weights_path, "delay_s": str(delay_s)}}
        self._post("/collective_rpc", body, timeout=None)  # the caller's deadline bounds this
        self._post("/reset_prefix_cache", None, timeout=60.0)

    def checksum(self) -> float:
        return float(self._post("/collective_rpc", {"method": "fleetloop_weight_checksum"}, 60.0)["results"][0])

    def close(self) -> None:
        if self.proc is not None:
            _stop_processes([self.proc.pid], _descendants(self.proc.pid) + self.pids)
            self.proc.wait(timeout=10)
        self.proc, self.pids = None, []
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
