"""ChatEngine on vLLM's async engine (AsyncLLM), in the server process.

vLLM runs its engine core in a child process (spawned), so whatever program starts it needs an
`if __name__ == "__main__":` guard. Requests reach the AsyncLLM through vLLM's own OpenAI serving
classes (serving/openai_layer.py), which render, tokenize and check them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopchat.errors import AdapterLoadError
from loopchat.settings import Settings
from serving.engine import cpu_lora
from serving.engine.base import (
    AdapterSpec,
    EngineError,
    EngineNotReady,
    EngineStats,
    LoRACapacity,
)

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency of vllm
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16, and AMX beside it), the test
    vLLM's CPU backend itself uses for its bf16 kernels. Without it, bf16 is emulated and 3-10x
    slower than float32."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported())


def default_dtype(*, on_gpu: bool) -> str:
    """`dtype: auto`: bfloat16 where the hardware has it natively (GPUs, CPUs with AVX512-BF16),
    as vLLM's own default; float32 on other CPUs, where vLLM's bfloat16 default is emulated."""
    return "bfloat16" if on_gpu or cpu_has_native_bf16() else "float32"


def configure_vllm_environment(settings: Settings, *, on_gpu: bool) -> None:
    """Environment vLLM reads at import and start-up; must run before `import vllm`."""
    settings.vllm_cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(settings.vllm_cache_dir))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not on_gpu:
        # Without an explicit KV size vLLM refuses to start on these CPUs.
        kv_gib = settings.engine.kv_cache_space_gib
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # Read by serving.engine.cpu_lora's vLLM plugin in the engine core process.
        os.environ[cpu_lora.ENV] = settings.engine.cpu_lora_ops
        # vLLM 0.32 cannot load its own AOT-compiled model on CPU ("'function' object has no
        # attribute 'finalize_loading'") and compiles again at every engine start: 70-100 s on 2
        # cores, paid by every LoRA room change too. Without AOT, torch's inductor cache is
        # used: the engine's start-up falls to about 12 s once a shape has been compiled.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        inductor_cache = Path(os.environ["VLLM_CACHE_ROOT"]) / "inductor"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))


def initial_lora(settings: Settings, *, on_gpu: bool) -> LoRACapacity | None:
    """The LoRA room an engine starts with: none where it follows demand, else the configured one
    (on CPU with the spare slot LoRACapacity.fitting explains)."""
    if lora_on_demand(settings, on_gpu=on_gpu):
        return None
    eng = settings.engine
    return LoRACapacity(eng.max_loras + int(not on_gpu), eng.max_lora_rank)


def lora_on_demand(settings: Settings, *, on_gpu: bool) -> bool:
    mode = settings.engine.lora
    if mode == "on_demand" and on_gpu:
        # A second engine beside the first does not fit where each takes most of the GPU's memory.
        raise EngineError("engine.lora on_demand needs room for two engines; on GPUs use lora: always")
    return mode == "on_demand" or (mode == "auto" and not on_gpu)


def build_engine_args(settings: Settings, *, on_gpu: bool, lora: LoRACapacity | None) -> Any:
    """vLLM AsyncEngineArgs for these settings, with CPU or GPU defaults and this LoRA room."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    eng = settings.engine
    dtype = eng.dtype if eng.dtype != "auto" else default_dtype(on_gpu=on_gpu)
    kwargs: dict[str, Any] = dict(
        model=str(settings.model_path),
        tokenizer=str(settings.model_path),
        served_model_name=[settings.model_name],
        dtype=dtype,
        # None: vLLM's default, compiled (torch.compile on CPU, CUDA graphs on GPU).
        enforce_eager=bool(eng.enforce_eager),
        max_model_len=eng.max_model_len,
        max_num_seqs=eng.max_num_seqs,
        seed=eng.seed,
        tensor_parallel_size=eng.tensor_parallel_size,
        # Our own stat logger collects what monitoring needs; vLLM's periodic log line is noise.
        disable_log_stats=True,
        enable_log_requests=False,
    )
    if lora is not None:
        kwargs.update(
            enable_lora=True,
            max_loras=lora.slots,
            max_lora_rank=lora.max_rank,
            max_cpu_loras=max(eng.max_cpu_loras or 0, lora.slots),
        )
    if on_gpu:
        kwargs["gpu_memory_utilization"] = eng.gpu_memory_utilization
    return AsyncEngineArgs(**kwargs)


def _make_stat_logger_factory(sink: EngineStats) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _SchedulerStatsSink(StatLoggerBase):
        """Copies the scheduler's numbers into `sink` after every engine step."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                sink.running_requests = scheduler_stats.num_running_reqs
                sink.waiting_requests = scheduler_stats.num_waiting_reqs
                sink.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return _SchedulerStatsSink


class VLLMEngine:
    def __init__(self, settings: Settings, *, lora: LoRACapacity | None | str = "initial") -> None:
        self._settings = settings
        self._on_gpu = cuda_available()
        self._lora_on_demand = lora_on_demand(settings, on_gpu=self._on_gpu)
        self._lora = initial_lora(settings, on_gpu=self._on_gpu) if lora == "initial" else lora
        self._engine: AsyncLLM | None = None
        self._stats = EngineStats()
        self._max_model_len = settings.engine.max_model_len or 0
        self._adapter_ids: set[int] = set()
        self._ready = False

    @property
    def model_name(self) -> str:
        return self._settings.model_name

    @property
    def model_path(self) -> Path:
        return self._settings.model_path

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def client(self) -> AsyncLLM:
        if self._engine is None:
            raise EngineNotReady("engine is not ready")
        return self._engine

    @property
    def ready(self) -> bool:
        return self._ready and self._engine is not None and not self._engine.errored

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    @property
    def lora(self) -> LoRACapacity | None:
        return self._lora

    @property
    def lora_on_demand(self) -> bool:
        return self._lora_on_demand

    async def start(self, *, building_nice: int = 0) -> None:
        configure_vllm_environment(self._settings, on_gpu=self._on_gpu)
        if not (self._settings.model_path / "config.json").is_file():
            raise EngineError(
                f"no model at {self._settings.model_path}; run `loopchat model prepare` "
                "or set LOOPCHAT_BASE_MODEL to a Hugging Face model folder"
            )
        # Building the engine blocks for the model load; keep the event loop (health probes) free.
        self._engine = await _in_thread(self._build, nice=building_nice, discard=_shutdown)
        self._stats.lora_slots = self._lora.slots if self._lora else 0
        self._stats.lora_max_rank = self._lora.max_rank if self._lora else 0
        self._max_model_len = self._engine.model_config.max_model_len
        lower_engine_priority(self._nice)
        if self._settings.engine.warmup:
            await self._warmup()
        self._ready = True
        logger.info(
            "engine ready: %s (%s, max_model_len=%d, %s, compilation %s)",
            self.model_name,
            "cuda" if self._on_gpu else "cpu",
            self._max_model_len,
            f"LoRA {self._lora.slots} x rank {self._lora.max_rank}" if self._lora else "no LoRA",
            self._engine.vllm_config.compilation_config.mode.name,
        )

    def _build(self) -> AsyncLLM:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = build_engine_args(self._settings, on_gpu=self._on_gpu, lora=self._lora)
        return AsyncLLM.from_engine_args(args, stat_loggers=[_make_stat_logger_factory(self._stats)])

    async def _warmup(self) -> None:
        # The first forward pass is several times slower than the rest; pay it before serving.
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input

        assert self._engine is not None
        params = SamplingParams(max_tokens=2, temperature=0)
        async for _ in self._engine.generate(tokens_input([1, 2, 3, 4]), params, "warmup"):
            pass

    async def shutdown(self) -> None:
        self._ready = False
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.shutdown)

    async def add_adapter(self, adapter: AdapterSpec) -> None:
        if self._engine is None:
            raise EngineNotReady("engine is not ready")
        from vllm.lora.request import LoRARequest

        from rollout.registry import read_adapter_config

        if self._lora is None:
            raise AdapterLoadError(f"adapter {adapter.name!r}: this engine was built without LoRA")
        read_adapter_config(adapter.path, max_rank=self._lora.max_rank)
        request = LoRARequest(adapter.name, adapter.engine_id, str(adapter.path))
        try:
            await self._engine.add_lora(request)
        except Exception as exc:
            raise AdapterLoadError(f"adapter {adapter.name!r} failed to load: {exc}") from exc
        self._adapter_ids.add(adapter.engine_id)
        self._stats.loaded_adapters = len(self._adapter_ids)

    async def remove_adapter(self, adapter: AdapterSpec) -> None:
        if self._engine is not None:
            await self._engine.remove_lora(adapter.engine_id)
        self._adapter_ids.discard(adapter.engine_id)
        self._stats.loaded_adapters = len(self._adapter_ids)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        engine = self.client
        # "wait": the requests in flight finish on the weights they started on; new ones queue.
        await engine.pause_generation(mode="wait", clear_cache=True)
        try:
            yield
        finally:
            await engine.resume_generation()

    async def reload_weights(self, model_dir: Path) -> None:
        # vLLM's in-place reload (the RL weight-sync path): same tensors, new values, no restart.
        await self.client.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        self._adapter_ids.clear()
        self._stats.loaded_adapters = 0

    @property
    def _nice(self) -> int:
        nice = self._settings.engine.engine_cpu_nice
        return 10 if nice is None and not self._on_gpu else nice or 0

    async def replacement(self, lora: LoRACapacity | None) -> VLLMEngine:
        sibling = VLLMEngine(self._settings, lora=lora)
        try:
            # Built at the lowest priority, the serving engine keeps the cores while it compiles
            # (where engines run niced at all: raising the priority back may need privileges).
            await sibling.start(building_nice=19 if self._nice > 0 else 0)
        except BaseException:
            await sibling.shutdown()
            raise
        return sibling

    def take_over(self, replacement: VLLMEngine) -> None:  # type: ignore[override]
        # Swapped, not copied: the stat logger of each AsyncLLM writes into the stats it came with.
        for name in ("_engine", "_lora", "_stats", "_adapter_ids", "_max_model_len"):
            mine, theirs = getattr(self, name), getattr(replacement, name)
            setattr(self, name, theirs)
            setattr(replacement, name, mine)

    def stats(self) -> EngineStats:
        if self._engine is not None:
            self._stats.unfinished_requests = self._engine.get_num_unfinished_requests()
        return self._stats


def _in_thread(build: Any, *, nice: int, discard: Any) -> asyncio.Future[Any]:
    """`build()` in a thread of its own at this nice value (the engine processes it spawns
    inherit it: Linux keeps a nice value per thread, and children start with their parent
    thread's). If the wait is cancelled, what the build still makes is given to `discard`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        if nice > 0:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        try:
            result = build()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, done, None, exc, discard)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None, discard)

    threading.Thread(target=run, name="engine-build", daemon=True).start()
    return done


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None, discard: Any) -> None:
    if future.done():  # cancelled: nobody takes the engine, stop it
        if result is not None:
            threading.Thread(target=discard, args=(result,), name="engine-discard", daemon=True).start()
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _shutdown(engine: AsyncLLM) -> None:
    engine.shutdown()


def lower_engine_priority(nice: int) -> None:
    """Renice every thread of the engine's child processes (the engine core and its OpenMP pool).

    On a CPU machine the engine core would otherwise take the cores from the API process, whose
    work (parsing requests, streaming tokens, storing ratings) is short and latency-bound. Linux
    keeps a nice value per thread, so each existing thread is set; threads started later inherit
    the value of the thread that starts them.
    """
    if nice <= 0:
        return
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            for thread in child.threads():
                os.setpriority(os.PRIO_PROCESS, thread.id, nice)
        except (psutil.Error, OSError) as exc:
            logger.warning("could not lower the priority of engine process %d: %s", child.pid, exc)
            continue
    logger.info("engine processes run at nice %d", nice)
