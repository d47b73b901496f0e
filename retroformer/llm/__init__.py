"""LLM backends: OpenAI-compatible HTTP, in-process Hugging Face, and scripted doubles, behind :class:`LLM`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from retroformer.config import doc
from retroformer.errors import ConfigError
from retroformer.llm.base import LLM, Completion, GenerationRequest, SamplingParams, apply_stop, is_openai_url
from retroformer.llm.scripted import ScriptedLLM

__all__ = [
    "LLM",
    "Completion",
    "GenerationRequest",
    "LLMConfig",
    "SamplingParams",
    "ScriptedLLM",
    "apply_stop",
    "build_llm",
    "register_scripted_policy",
]


@dataclass
class LLMConfig:
    """Which model answers, where it runs, and how it decodes."""

    # --- which backend ---
    backend: Literal["hf", "openai", "scripted"] = doc(
        "hf: in-process Hugging Face model; openai: any OpenAI-compatible server (OpenAI, vLLM, llm/serve.sh); "
        "scripted: a deterministic test double",
        "hf",
    )
    model: str = doc("hub id, local path, or the model name the server knows", "runs/tiny/lm")
    adapter: str | None = doc("LoRA adapter directory applied on top of `model` (hf backend)", None)
    # --- OpenAI-compatible server ---
    base_url: str | None = doc("server URL, e.g. http://127.0.0.1:8000/v1; None uses the SDK default (OpenAI)", None)
    api_key_env: str | None = doc(
        "name of the environment variable holding the API key (read from .env by the scripts); null: "
        "OPENAI_API_KEY for OpenAI's own URL and no key for any other server, so a key reaches another server only "
        "when named here",
        None,
    )
    revision: str | None = doc(
        "a served model's revision or fingerprint (e.g. the adapter checkpoint); part of the response cache key, so "
        "a model retrained and served under the same name is not answered from the old one's cache",
        None,
    )
    style: Literal["chat", "completion"] = doc(
        "chat: /chat/completions (hf: the tokenizer's chat template, when it has one); completion: /completions "
        "(hf: plain text). Use completion for a reflector trained by sft_run.py on plain prompt/completion text",
        "chat",
    )
    concurrency: int = doc("most requests in flight at once against this backend", 8)
    max_retries: int = doc("retries on timeouts, 429 and 5xx before the call fails", 5)
    timeout_s: float = doc("per-request timeout in seconds", 60.0)
    retry_backoff_s: float = doc("first retry delay in seconds; doubled per retry with jitter (at most 20 s)", 0.5)
    http_client: Literal["aiohttp", "httpx"] = doc(
        "openai: the SDK's own HTTP client. aiohttp: openai.DefaultAioHttpClient (HTTP parsed in C, less client CPU "
        "per call); httpx: the SDK's default httpx client. Both keep one connection alive per request in flight and "
        "follow no redirects",
        "aiohttp",
    )
    # --- decoding ---
    max_tokens: int = doc("most new tokens per call", 128)
    temperature: float = doc("sampling temperature; 0 is greedy", 0.0)
    top_p: float = doc("nucleus sampling threshold", 1.0)
    seed: int | None = doc("sampling seed, where the backend supports one", None)
    # --- in-process ---
    batch_size: int = doc("hf: most prompts generated together in one batch", 8)
    device: str = doc("hf: 'auto', 'cpu', 'cuda', 'cuda:1', ...", "auto")
    dtype: str = doc("hf: 'auto', 'float32', 'bfloat16' or 'float16'", "auto")
    max_prompt_tokens: int = doc("hf: prompts longer than this keep their last tokens", 1024)
    # --- scripted ---
    scripted_policy: str | None = doc("scripted: name of a registered scripted policy (e.g. 'synthetic-clue')", None)
    scripted_options: dict = doc(
        "scripted: options passed to the policy (e.g. {carry_prob: 0.5, seed: 0})", default_factory=dict
    )
    scripted_replies: list[str] = doc("scripted: fixed replies returned in turn (cycled)", default_factory=list)

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_tokens", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"llm.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.retry_backoff_s) and self.retry_backoff_s >= 0):
            raise ConfigError(f"llm.retry_backoff_s must be a finite number >= 0, got {self.retry_backoff_s}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(
                f"llm.timeout_s must be a finite number of seconds > 0 (it bounds every attempt), got {self.timeout_s}"
            )
        if self.base_url is not None:
            check_base_url(self.base_url, self.api_key_env)
        if self.max_retries < 0:
            raise ConfigError(f"llm.max_retries must be >= 0, got {self.max_retries}")
        if self.temperature < 0:
            raise ConfigError(f"llm.temperature must be >= 0, got {self.temperature}")
        if self.backend == "scripted" and not (self.scripted_policy or self.scripted_replies):
            raise ConfigError("llm.backend=scripted needs llm.scripted_policy or llm.scripted_replies")

    def key_env(self) -> str | None:
        """The environment variable whose key this model's server gets (see ``api_key_env``), None for no key."""
        if self.api_key_env:
            return self.api_key_env
        return "OPENAI_API_KEY" if self.backend == "openai" and is_openai_url(self.base_url) else None

    def sampling(self, stop: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, stop=stop, seed=self.seed
        )


def check_base_url(url: str, api_key_env: str | None = None) -> None:
    """A ConfigError unless ``url`` is an http(s) URL with a host and without credentials. The error never repeats a
    user name or password (nothing is written or logged with them: the config is refused before it is saved)."""
    try:
        parts = urlsplit(url)
        has_credentials = parts.username is not None or parts.password is not None
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"llm.base_url is not a valid URL ({exc}); expected e.g. http://127.0.0.1:8000/v1") from None
    if has_credentials:
        shown = f"{parts.scheme}://***@{host}" if host else "the URL"
        raise ConfigError(
            f"llm.base_url holds a user name or password ({shown}...); credentials do not belong in a URL, where they "
            "would be saved with the config and logged. Remove them and put the key in the environment variable that "
            f"llm.api_key_env names (now {api_key_env or 'unset: set llm.api_key_env, e.g. MY_SERVER_KEY'}), e.g. in .env"
        )
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(
            f"llm.base_url={url!r} needs a scheme and a host (http:// or https://), e.g. http://127.0.0.1:8000/v1 or "
            f"https://api.example.com/v1"
        )


_SCRIPTED_POLICIES: dict[str, Callable[..., LLM]] = {}


def register_scripted_policy(name: str) -> Callable[[Callable[..., LLM]], Callable[..., LLM]]:
    """Register a factory ``f(**options) -> LLM`` usable as ``backend: scripted, scripted_policy: name``."""

    def wrap(factory: Callable[..., LLM]) -> Callable[..., LLM]:
        _SCRIPTED_POLICIES[name] = factory
        return factory

    return wrap


def build_llm(cfg: LLMConfig, api_key: str | None = None) -> LLM:
    """Build the backend ``cfg`` names. ``api_key`` comes from the environment via the calling script."""
    if cfg.backend == "scripted":
        if cfg.scripted_policy:
            if cfg.scripted_policy not in _SCRIPTED_POLICIES:
                raise ConfigError(
                    f"unknown scripted policy {cfg.scripted_policy!r}; registered: {sorted(_SCRIPTED_POLICIES)}. "
                    "A policy is registered by the module that defines it (the vault's 'synthetic-clue' by "
                    "retroformer.envs.synthetic, loaded with env.name=synthetic); import that module first"
                )
            return _SCRIPTED_POLICIES[cfg.scripted_policy](**cfg.scripted_options)
        return ScriptedLLM(cfg.scripted_replies, model_id="scripted", cycle=True)
    if cfg.backend == "openai":
        from retroformer.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg, api_key=api_key, backoff_s=cfg.retry_backoff_s)
    from retroformer.llm.hf_backend import HFBackend

    return HFBackend(cfg)
