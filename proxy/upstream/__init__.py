"""Upstream adapters, one module each, all behind proxy.upstream.base.Upstream."""

from __future__ import annotations

from proxy.config import UpstreamConfig
from proxy.upstream.base import CallOptions, ForwardResponse, Upstream
from proxy.upstream.openai import OpenAIUpstream

__all__ = ["CallOptions", "ForwardResponse", "Upstream", "make_upstream"]


def make_upstream(cfg: UpstreamConfig) -> Upstream:
    if cfg.kind == "openai":
        return OpenAIUpstream(cfg)
    if cfg.kind == "vllm":
        from proxy.upstream.vllm import VLLMUpstream

        return VLLMUpstream(cfg)
    if cfg.kind == "anthropic":
        from proxy.upstream.anthropic import AnthropicUpstream

        return AnthropicUpstream(cfg)
    raise ValueError(f"unknown upstream kind {cfg.kind!r}")
