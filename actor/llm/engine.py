"""A vLLM engine an LLM actor drives: grouped sampling with behaviour log-probs, live weight
updates with a deadline, a version tag on every completion, supervision (restart + reload).

Two modes, one contract (:class:`VllmEngine`):

- ``inprocess``: ``vllm.LLM`` in this process; vLLM runs its EngineCore and its worker as child
  processes (we record their pids and kill only those).
- ``server``: an OpenAI-compatible ``python -m vllm.entrypoints.openai.api_server`` subprocess that
  this class starts and supervises; generation through ``/v1/completions`` (token ids in and out,
  ``return_token_ids``), weight updates through its dev endpoints (``/collective_rpc``,
  ``/reset_prefix_cache``; ``VLLM_SERVER_DEV_MODE=1``).

Weight updates use vLLM's own in-place reload (``Worker.reload_weights(weights_path=...)``, the
layerwise reload that also redoes any post-load weight processing), reached through
``collective_rpc``. The learner's Hugging Face state dict is validated against the model folder
(:func:`fleetloop.llm_models.check_lm_state_dict`), staged as ``<work_dir>/v<version>/model.safetensors``
and reloaded from there; the prefix cache is reset afterwards. The staged folder of the newest good
version is kept: :meth:`VllmEngine.ensure_running` reloads it into a restarted engine.

Invariants:

- Updates happen between ``generate`` calls (one lock): every completion of a ``generate`` call was
  produced entirely by the weights of ``policy_version``, the version loaded when the call started.
- ``version`` changes only when an update completed (reload and prefix-cache reset both done).
- An update that misses its deadline raises :class:`WeightUpdateTimeout`, is counted, keeps the
  old version tag and marks the engine not ``alive()`` (the reload may still be running and leave
  mixed weights), so the supervisor's :meth:`VllmEngine.ensure_running` restarts it on the last good
  weights. Nothing here waits without a deadline.
- Sampled log-probs are vLLM's ``processed_logprobs``: the log-probability of the sampled token
  under the distribution actually sampled from (after temperature and top-p/top-k).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from actor.llm.vllm_backends import InProcessBackend, ServerBackend
from fleetloop import llm_models
from fleetloop.errors import FailedPrecondition, InvalidArgument, Unavailable
from fleetloop.logs import event, get_logger
from fleetloop.weights import load_verified

log = get_logger("actor.llm.engine")



class WeightUpdateTimeout(Unavailable):
    """A live weight update missed its deadline (retryable: the engine restarts on the last good weights)."""


class EngineConfig(BaseModel):
    """Settings of one vLLM engine."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field(description="Hugging Face model folder (config, safetensors, tokenizer); its weights are version `initial_version`.")
    mode: Literal["inprocess", "server"] = Field("inprocess", description="vllm.LLM in this process, or a supervised OpenAI-compatible server subprocess.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights/activation dtype (float32: bf16 is slow on CPUs without AMX).")
    max_model_len: int = Field(512, ge=16, le=131072, description="Prompt + completion tokens per sequence.")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Sequences the engine batches at once.")
    seed: int = Field(0, description="Engine seed (per-request seeds come with generate()).")
    initial_version: int = Field(0, ge=0, description="Policy version of the weights in model_dir.")
    enforce_eager: bool = Field(True, description="Skip torch.compile (faster start; tiny models gain nothing from compiling).")
    enable_prefix_caching: bool = Field(True, description="Share prompt KV across the G completions of a group (reset at every update).")
    kv_cache_gib: int = Field(1, ge=1, le=1024, description="CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads_bind: str = Field("auto", min_length=1, description="VLLM_CPU_OMP_THREADS_BIND: 'auto', a core list like '0' or '0-3', or 'nobind'.")
    cpu_reserved: int = Field(0, ge=0, description="VLLM_CPU_NUM_OF_RESERVED_CPU: cores left to the frontend process.")
    work_dir: str | None = Field(None, description="Where updates are staged (None: a private temp folder, in /dev/shm when present).")
    start_timeout_s: float = Field(600.0, gt=0, description="Deadline of engine start-up (server mode: until /health answers).")
    request_timeout_s: float = Field(600.0, gt=0, description="Deadline of one generate() call in server mode.")
    server_host: str = Field("127.0.0.1", description="Server mode: bind address.")
    server_port: int | None = Field(None, ge=1, le=65535, description="Server mode: port (None: a free one).")


@dataclass(frozen=True)
class Sample:
    """One completion: ``logprobs[i]`` is the log-prob of ``token_ids[i]`` under the sampling
    distribution (processed: after temperature and top-p)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: int


@dataclass
class EngineCounters:
    """Totals since construction."""

    starts: int = 0
    restarts: int = 0
    updates_ok: int = 0
    updates_failed: int = 0
    update_timeouts: int = 0
    generate_calls: int = 0
    tokens_generated: int = 0


class VllmEngine:
    """One vLLM engine with versioned live weight updates (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.counters = EngineCounters()
        self._lock = threading.RLock()
        self._backend: InProcessBackend | ServerBackend | None = None
        self._poisoned = False
        self._version = config.initial_version
        self._last_good: tuple[int, Path] | None = None  # (version, staged folder) of the newest good update
        self._own_work_dir = config.work_dir is None
        self._work_dir: Path | None = Path(config.work_dir) if config.work_dir else None
        self._expected: dict[str, tuple[int, ...]] | None = None
        self.vocab_size = int(json.loads((Path(config.model_dir) / "config.json").read_text())["vocab_size"])

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def work_dir(self) -> Path:
        """Staging folder of weight updates (created on first use; removed by close() when private)."""
        if self._work_dir is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._work_dir = Path(tempfile.mkdtemp(prefix="fleetloop-vllm-", dir=shm))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    @property
    def version(self) -> int:
        """Policy version of the weights the engine runs."""
        return self._version

    @property
    def pids(self) -> list[int]:
        """Pids of the engine processes this engine started, whose death means a dead engine:
        in-process the worker(s) then EngineCore; server mode EngineCore, worker(s), then the server.
        (Helper processes are not listed; close() stops them too.)"""
        return list(self._backend.pids) if self._backend is not None else []

    def start(self) -> float:
        """Start the engine on the model folder's weights (version ``initial_version``); seconds taken."""
        with self._lock:
            if self._backend is not None:
                raise FailedPrecondition("engine already started", field="state", value="started")
            t0 = time.monotonic()
            backend = InProcessBackend(self.config) if self.config.mode == "inprocess" else ServerBackend(self.config)
            try:
                backend.start()
            except BaseException:
                backend.close()
                raise
            self._backend, self._poisoned = backend, False
            self._version = self.config.initial_version
            self.counters.starts += 1
            seconds = time.monotonic() - t0
            event(log, "engine_started", version=self._version, mode=self.config.mode, seconds=seconds, pids=self.pids)
            return seconds

    def alive(self) -> bool:
        """True when started, not poisoned by a timed-out update, and every child process runs."""
        b = self._backend
        return b is not None and not self._poisoned and b.alive()

    def ensure_running(self, timeout_s: float = 300.0) -> bool:
        """Restart a dead (or poisoned) engine and reload the last good weights; True if it restarted."""
        with self._lock:
            if self.alive():
                return False
            old = self._version
            self._stop_backend()
            self.start()
            self.counters.restarts += 1
            if self._last_good is not None:
                version, folder = self._last_good
                self._reload(folder, version, timeout_s, delay_s=0.0)
            event(log, "engine_restarted", version=self._version, previous=old)
            return True

    def close(self) -> None:
        """Stop the engine (kill the processes it started, by pid) and remove its staging folder."""
        with self._lock:
            self._stop_backend()
            if self._own_work_dir and self._work_dir is not None:
                shutil.rmtree(self._work_dir, ignore_errors=True)
                self._work_dir, self._last_good = None, None

    def _stop_backend(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = None

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[list[Sample]]:
        """``n`` completions of every prompt (one list per prompt, in order), each tagged with the
        version loaded when this call started. Prompt ``i`` samples with seed ``seed + i * n`` (vLLM
        gives its ``j``-th completion ``seed + i * n + j``)."""
        self._check_generate(prompt_token_ids, n, max_new_tokens, temperature, top_p)
        with self._lock:
            if not self.alive():
                raise Unavailable("engine is not running (call ensure_running)", field="engine", value="dead")
            version = self._version
            base = {"n": n, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
            seeds = [None if seed is None else seed + i * n for i in range(len(prompt_token_ids))]
            if isinstance(self._backend, ServerBackend):
                params: list[Any] = [dict(base, **({} if s is None else {"seed": s})) for s in seeds]
            else:
                from vllm import SamplingParams

                params = [SamplingParams(**base, logprobs=0, seed=s) for s in seeds]
            try:
                raw = self._backend.generate(prompt_token_ids, params)
            except Exception as exc:
                if not self.alive():
                    raise Unavailable(f"engine died during generate: {exc}", field="engine", value="dead") from exc
                raise
        out = []
        for group in raw:
            samples = []
            for ids, lps, text, finish in group:
                if len(lps) != len(ids):
                    raise Unavailable(f"engine returned {len(lps)} logprobs for {len(ids)} tokens", field="logprobs", value=len(lps))
                samples.append(Sample(ids, lps, text, finish, version))
                self.counters.tokens_generated += len(ids)
            out.append(samples)
        self.counters.generate_calls += 1
        return out

    def _check_generate(self, prompts: list[list[int]], n: int, max_new: int, temperature: float, top_p: float) -> None:
        if not prompts:
            raise InvalidArgument("no prompts", field="prompt_token_ids", value=0)
        for name, val, ok in (("n", n, n >= 1), ("max_new_tokens", max_new, max_new >= 1),
                              ("temperature", temperature, temperature >= 0), ("top_p", top_p, 0 < top_p <= 1)):
            if not ok:
                raise InvalidArgument("out of range", field=name, value=val)
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidArgument("empty prompt", field=f"prompt_token_ids[{i}]", value=0)
            if len(p) + max_new > self.config.max_model_len:
                raise InvalidArgument(f"prompt {len(p)} + max_new_tokens {max_new} > max_model_len {self.config.max_model_len}",
                                      field=f"prompt_token_ids[{i}]", value=len(p))
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgument(f"token id outside [0, {self.vocab_size})", field=f"prompt_token_ids[{i}]", value=bad[0])

    # -- weights -------------------------------------------------------------------------------
    def update_weights(self, weights: bytes | memoryview | str | Path | dict[str, torch.Tensor], version: int,
                       timeout_s: float, sha256: str | None = None, strip_prefix: str = "",
                       _inject_delay_s: float = 0.0) -> float:
        """Load ``weights`` (a safetensors blob, a path to a safetensors file, or a state dict with
        Hugging Face names) into the running engine as ``version``; seconds taken.

        Validated first (InvalidArgument; counted; the engine is untouched). Waiting for a running
        ``generate`` counts against ``timeout_s``. On timeout: WeightUpdateTimeout, counted, the
        version tag unchanged, and the engine not ``alive()`` until ``ensure_running`` restarts it on
        the last good weights. ``_inject_delay_s`` delays the reload inside the worker (tests only).
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        try:
            blob, state_dict = self._as_state_dict(weights, sha256)
            checked = llm_models.check_lm_state_dict(state_dict, self._expected_shapes(), strip_prefix)
            if checked.keys() != state_dict.keys():
                blob = None  # renamed or dropped tensors: stage a re-serialised copy
            t_checked = time.monotonic()
            if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise WeightUpdateTimeout(f"no gap between generate calls within {timeout_s}s", field="timeout_s", value=timeout_s)
        except Exception as exc:
            self._count_failure(exc, version)
            raise
        try:
            if not self.alive():
                exc = Unavailable("engine is not running (call ensure_running)", field="engine", value="dead")
                self._count_failure(exc, version)
                raise exc
            folder = self.work_dir / f"v{version}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            target = folder / llm_models.WEIGHTS_FILE
            if blob is not None:
                target.write_bytes(blob)
            else:
                from safetensors.torch import save_file

                save_file({k: v.detach().to("cpu").contiguous() for k, v in checked.items()}, str(target))
            t_staged = time.monotonic()
            try:
                self._reload(folder, version, max(0.0, deadline - time.monotonic()), _inject_delay_s)
            except Exception:
                if self._last_good is None or self._last_good[1] != folder:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            seconds = time.monotonic() - t0
            event(log, "weights_updated", version=version, seconds=seconds, tensors=len(checked), validate_s=t_checked - t0,
                  stage_s=t_staged - t_checked, reload_s=time.monotonic() - t_staged)
            return seconds
        finally:
            self._lock.release()

    def _reload(self, folder: Path, version: int, timeout_s: float, delay_s: float) -> None:
        """Reload ``folder`` with a deadline (caller holds the lock); on success tag ``version`` and
        keep ``folder`` as the last good weights."""
        box: dict[str, BaseException | None] = {}
        backend = self._backend

        def run() -> None:
            try:
                backend.reload(str(folder), delay_s)
                box["error"] = None
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                box["error"] = exc

        worker = threading.Thread(target=run, name=f"vllm-reload-v{version}", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            self._poisoned = True  # the reload may still land, half done: only a restart is safe
            exc: BaseException = WeightUpdateTimeout(f"weight update to version {version} did not finish in {timeout_s:.3g}s",
                                                     field="timeout_s", value=timeout_s)
            self._count_failure(exc, version)
            raise exc
        if box["error"] is not None:
            self._poisoned = True
            exc = Unavailable(f"weight update to version {version} failed in the engine: {box['error']}", field="version", value=version)
            self._count_failure(exc, version)
            raise exc from box["error"]
        previous = self._last_good
        self._version, self._last_good = version, (version, folder)
        self.counters.updates_ok += 1
        if previous is not None and previous[1] != folder:
            shutil.rmtree(previous[1], ignore_errors=True)

    def _count_failure(self, exc: BaseException, version: int) -> None:
        self.counters.updates_failed += 1
        if isinstance(exc, WeightUpdateTimeout):
            self.counters.update_timeouts += 1
        event(log, "weight_update_failed", level=40, version=self._version, target=version, error=str(exc)[:300])

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._expected is None:
            self._expected = llm_models.expected_weight_shapes(self.config.model_dir)
        return self._expected

    @staticmethod
    def _as_state_dict(weights: Any, sha256: str | None) -> tuple[bytes | None, dict[str, torch.Tensor]]:
        """(the safetensors bytes when given as bytes or a file, the tensors)."""
        if isinstance(weights, dict):
            return None, weights
        if isinstance(weights, (bytes, bytearray, memoryview)):
            blob = bytes(weights)
        elif isinstance(weights, (str, Path)):
            try:
                blob = Path(weights).read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"cannot read weights file: {exc}", field="weights", value=str(weights)) from exc
        else:
            raise InvalidArgument("expected bytes, a path or a state dict", field="weights", value=type(weights).__name__)
        if sha256 is not None:
            return blob, load_verified(blob, sha256)
        from safetensors.torch import load as st_load

        try:
            return blob, st_load(blob)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise InvalidArgument(f"not a safetensors blob: {exc}", field="weights", value=len(blob)) from exc

    def weight_checksum(self) -> float:
        """Sum of the engine's parameters, computed in its worker (a fingerprint for tests)."""
        with self._lock:
            if self._backend is None:
                raise Unavailable("engine is not running", field="engine", value="stopped")
            return self._backend.checksum()
