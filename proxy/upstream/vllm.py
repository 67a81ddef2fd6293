"""vLLM as an upstream: OpenAI-compatible, with herd guarding the GPU's capacity.

Every chat call holds a slot of a CapacityLimiter for as long as it streams. The limit
follows the backend's own load, read from its Prometheus `/metrics` every
`poll_interval_s`: KV-cache usage (`vllm:kv_cache_usage_perc`, or the older
`vllm:gpu_cache_usage_perc`) and requests waiting inside vLLM (`vllm:num_requests_waiting`).
Calls over the limit queue in herd (bounded); a full queue, or a wait that runs out, is a
503 with Retry-After rather than one more request for a GPU that is out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.apis.base import Wire
from proxy.chunks import Chunk
from proxy.config import VLLMUpstreamConfig
from proxy.resilience import CapacityLimiter
from proxy.upstream.base import CallOptions
from proxy.upstream.openai import OpenAIUpstream

log = logging.getLogger("herd.vllm")

KV_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
WAITING_METRIC = "vllm:num_requests_waiting"


def metrics_url(base_url: str) -> str:
    """The default `/metrics` address: the server root of an OpenAI base URL."""
    root = base_url.rstrip("/")
    return (root.removesuffix("/v1")) + "/metrics"


def parse_load(text: str) -> tuple[float | None, float | None]:
    """(KV-cache usage 0..1, requests waiting) from vLLM's metrics; None where not reported.

    Several engines (data parallel) report one sample each: the fullest cache and the sum
    of the waiting requests count.
    """
    samples: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.value)
    kv = next((max(samples[name]) for name in KV_METRICS if samples.get(name)), None)
    waiting = sum(samples[WAITING_METRIC]) if samples.get(WAITING_METRIC) else None
    return kv, waiting


class VLLMUpstream(OpenAIUpstream):
    kind = "vllm"

    cfg: VLLMUpstreamConfig

    def __init__(self, cfg: VLLMUpstreamConfig) -> None:
        super().__init__(cfg)
        self.metrics_url = cfg.metrics_url or metrics_url(cfg.base_url)
        self.capacity = CapacityLimiter(
            cfg.name,
            max_limit=cfg.max_concurrency,
            min_limit=cfg.min_concurrency,
            queue_size=cfg.queue_size,
            queue_timeout_s=cfg.queue_timeout_s,
            kv_high=cfg.kv_cache_high,
            waiting_high=cfg.waiting_high,
        )
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        self._poller = asyncio.create_task(self._poll(), name=f"herd-vllm-metrics-{self.name}")

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        await super().aclose()

    async def call(
        self, wire: Wire, body: dict, options: CallOptions, stream: bool = True
    ) -> AsyncGenerator[list[Chunk], None]:
        async with self.capacity.slot(), contextlib.aclosing(super().call(wire, body, options, stream)) as batches:
            async for batch in batches:
                yield batch

    async def read_load(self) -> tuple[float | None, float | None]:
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.cfg.poll_interval_s), connect=self.cfg.connect_timeout_s)
        async with self.session.get(self.metrics_url, timeout=timeout) as resp:
            resp.raise_for_status()
            return parse_load(await resp.text())

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                kv, waiting = await self.read_load()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
                if not failing:
                    log.warning(
                        "cannot read %s metrics (%s); keeping its concurrency limit",
                        self.name,
                        type(e).__name__,
                    )
                failing = True
            else:
                if failing:
                    log.info("reading %s metrics again", self.name)
                failing = False
                before = self.capacity.limit
                self.capacity.observe(kv, waiting)
                if self.capacity.limit < before:
                    log.info(
                        "concurrency limit of %s: %d -> %d (kv cache %s, waiting %s)",
                        self.name,
                        before,
                        self.capacity.limit,
                        kv,
                        waiting,
                    )
            await asyncio.sleep(self.cfg.poll_interval_s)
