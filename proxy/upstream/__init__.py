"""Upstream adapters, one module each, all behind proxy.upstream.base.Upstream."""

from __future__ import annotations

from proxy.config import AnthropicUpstreamConfig, UpstreamConfig, VLLMUpstreamConfig
from proxy.upstream.base import CallOptions, ForwardResponse, Upstream
from proxy.upstream.openai import OpenAIUpstream

__all__ = ["CallOptions", "ForwardResponse", "Upstream", "make_upstream"]


def make_upstream(cfg: UpstreamConfig) -> Upstream:
    if isinstance(cfg, VLLMUpstreamConfig):
        from proxy.upstream.vllm import VLLMUpstream

        return VLLMUpstream(cfg)
    if isinstance(cfg, AnthropicUpstreamConfig):
        from proxy.upstream.anthropic import AnthropicUpstream

        return AnthropicUpstream(cfg)
    if cfg.kind == "openai":
        return OpenAIUpstream(cfg)
    raise ValueError(f"unknown upstream kind {cfg.kind!r}")
