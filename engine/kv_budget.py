"""How many KV pages the engine's pool gets: a byte budget, like vLLM's gpu_memory_utilization
(CUDA) and VLLM_CPU_KVCACHE_SPACE (CPU).

    kv_cache_bytes set       -> that many bytes
    kv_cache_fraction set    -> that fraction of the device's free memory now (after the weights)
    neither, CUDA            -> 0.9 of free device memory
    neither, CPU             -> min(4 GiB, half of MemAvailable): vLLM's CPU default is 4 GiB,
                                and a CPU pool shares RAM with everything else on the host

The pool tensor is allocated once at this size; on CPU its pages cost resident memory only
once used (engine/page_pool.py), so the budget is a ceiling, not a reservation.
"""

from __future__ import annotations

import os

import torch

from engine.config import EngineConfig
from engine.kv_layout import KVLayout
from engine.page_pool import PagePool

CUDA_FRACTION = 0.9
CPU_DEFAULT_BYTES = 4 << 30
CPU_MAX_FRACTION = 0.5


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_bytes:
        return config.kv_cache_bytes
    if config.kv_cache_fraction is not None:
        return int(config.kv_cache_fraction * free_memory(device))
    if device.type == "cuda":
        return int(CUDA_FRACTION * free_memory(device))
    return min(CPU_DEFAULT_BYTES, int(CPU_MAX_FRACTION * free_memory(device)))


def pool_pages(config: EngineConfig, layout: KVLayout, device: torch.device,
               reserve: int = 0) -> int:
    """Pages (the null page included) that fit the budget less `reserve` bytes (the buffers of
    streamed cold KV). Raises ValueError below 2."""
    budget = budget_bytes(config, device)
    pages = (budget - reserve) // PagePool.page_bytes(layout, config.page_size)
    if pages < 2:
        raise ValueError(f"KV cache budget {budget} bytes holds no page of "
                         f"{config.page_size} tokens; raise kv_cache_bytes")
    return pages
