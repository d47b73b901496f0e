"""A content-addressed on-disk response cache around any :class:`LLM`.

Re-running identical trials (same model, prompt and deterministic decoding) then makes zero calls and returns the
same text. Only deterministic requests are cached (``SamplingParams.deterministic``: greedy, or seeded); sampled ones
pass straight through, since caching them would silently turn sampling into replay.

Key: sha256 of the JSON of (cache format version, the model's :attr:`~retroformer.llm.base.LLM.cache_identity`,
style, system, prompt, sampling params). The identity of a served model is its name, the full base URL (host, port
and path) and ``llm.revision``; of an in-process model its weights (path, size, modification time), adapter hash and
``max_prompt_tokens``. One JSON file
per key under ``<cache_dir>/<key[:2]>/<key>.json``, written atomically (temporary file + ``os.replace``), so a
killed run never leaves half a file. Files hold the request fields, the text, the finish reason and the token counts
of the original call; never an API key (the key is not part of a request).

Accounting: a cached :class:`Completion` has ``cached=True`` and ``Usage(calls=0, cached_calls=1)`` with zero tokens,
so summed usage and costs count only tokens actually sent. The original call's token counts are kept in the cache
file and summed in :attr:`CachedLLM.saved` (what the cache spared).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from retroformer.llm.base import LLM, Completion, GenerationRequest
from retroformer.types import Usage

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: keyed on the cache identity (full URL, revision, weights) instead of model_id


def cache_key(identity: str, style: str | None, request: GenerationRequest) -> str:
    """The sha256 hex digest identifying ``request`` sent to the model ``identity`` in ``style``."""
    fields = {
        "format": CACHE_FORMAT,
        "model": identity,
        "style": style,
        "system": request.system,
        "prompt": request.prompt,
        "params": dataclasses.asdict(request.params),
    }
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CachedLLM(LLM):
    """Wraps ``inner``; answers deterministic requests from ``cache_dir`` when it can, else asks ``inner`` and stores.

    ``hits``/``misses``/``bypassed`` count requests; ``saved`` sums the token counts that hits did not spend.
    """

    def __init__(self, inner: LLM, cache_dir: str | os.PathLike[str]) -> None:
        self.inner = inner
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0
        self.bypassed = 0
        self.saved = Usage()

    @property
    def model_id(self) -> str:  # type: ignore[override]
        return self.inner.model_id

    @property
    def style(self) -> str | None:
        return getattr(self.inner, "style", None)

    def __repr__(self) -> str:
        return f"CachedLLM({self.inner!r}, cache_dir={str(self.cache_dir)!r})"

    def path_for(self, request: GenerationRequest) -> Path:
        key = cache_key(self.inner.cache_identity, self.style, request)
        return self.cache_dir / key[:2] / f"{key}.json"

    def _read(self, path: Path) -> dict | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            logger.warning("ignoring unreadable cache file %s (%s); it will be rewritten", path, exc)
            return None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("text"), str):
            logger.warning("ignoring cache file %s with unexpected contents; it will be rewritten", path)
            return None
        return data

    def _write(self, path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            # Never leave a temporary file behind; the error itself propagates.
            Path(tmp).unlink(missing_ok=True)
            raise

    async def generate(self, request: GenerationRequest) -> Completion:
        if not request.params.deterministic:
            self.bypassed += 1
            return await self.inner.generate(request)
        path = self.path_for(request)
        data = self._read(path)
        if data is not None:
            self.hits += 1
            original = Usage(**data.get("usage", {}))
            self.saved.add(original)
            return Completion(
                text=data["text"],
                usage=Usage(calls=0, cached_calls=1),
                model_id=self.inner.model_id,
                finish_reason=data.get("finish_reason", "stop"),
                cached=True,
            )
        self.misses += 1
        completion = await self.inner.generate(request)
        if completion.cached:
            return completion
        self._write(
            path,
            {
                "format": CACHE_FORMAT,
                "model_id": self.inner.model_id,
                "model": self.inner.cache_identity,
                "style": self.style,
                "system": request.system,
                "prompt": request.prompt,
                "params": dataclasses.asdict(request.params),
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "usage": dataclasses.asdict(completion.usage),
            },
        )
        return completion

    def wind_down(self) -> None:
        self.inner.wind_down()

    async def aclose(self) -> None:
        await self.inner.aclose()
