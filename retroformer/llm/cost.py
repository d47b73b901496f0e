"""Token cost accounting: a price table, ``usage_cost``, and a :class:`CostLedger` per (role, model) with a budget.

The default prices are EXAMPLES, in US dollars per million tokens, copied from public price lists at one point in
time; providers change them. Check them against your provider before trusting a dollar figure, and pass your own
table (``budget.prices`` in a trial config; ``CostLedger(prices=...)`` / ``usage_cost(..., prices=...)``) where they
differ. Dated snapshots (``gpt-4o-mini-2024-07-18``) cost what their model costs. Local models (in-process,
scripted, or served from a local address) cost 0; an unknown remote model costs 0 with a warning, once per model.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from retroformer.errors import BudgetExceeded
from retroformer.llm.base import LLM, Completion, GenerationRequest
from retroformer.types import Usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Price:
    """US dollars per million prompt tokens and per million completion tokens."""

    prompt_per_m: float
    completion_per_m: float


#: Example prices (USD per 1M tokens); check them against your provider's current price list.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
_warned: set[str] = set()
_warned_lock = threading.Lock()


def is_local_model(model_id: str) -> bool:
    """Whether ``model_id`` names a model that costs nothing per token.

    In-process HF models are named by a path or hub id (with a ``/``, maybe ``+adapter:...``), scripted doubles start
    with ``scripted``, and servers reached by :class:`~retroformer.llm.openai_backend.OpenAIBackend` carry
    ``@<host>``: local when the host is this machine. OpenAI's own models are bare names such as ``gpt-4o-mini``.
    """
    if model_id.startswith("scripted") or "+adapter:" in model_id:
        return True
    if "@" in model_id:
        return model_id.rsplit("@", 1)[1] in _LOCAL_HOSTS
    return "/" in model_id


#: A dated snapshot suffix: ``gpt-4o-mini-2024-07-18``, ``gpt-3.5-turbo-0125``.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def price_for(model_id: str, prices: dict[str, Price] | None = None) -> Price | None:
    """The price of ``model_id``: the exact name, the name before ``@host``, or a dated snapshot's name without its
    date (``gpt-4o-mini-2024-07-18`` costs what ``gpt-4o-mini`` costs); None if unknown."""
    table = DEFAULT_PRICES if prices is None else prices
    name = model_id.rsplit("@", 1)[0]
    for candidate in (model_id, name, _SNAPSHOT.sub("", name)):
        if candidate in table:
            return table[candidate]
    return None


def usage_cost(model_id: str, usage: Usage, prices: dict[str, Price] | None = None) -> float:
    """Dollars spent on ``usage`` with ``model_id``: 0 for local models, and for unknown ones (warning once each)."""
    price = price_for(model_id, prices)
    if price is None:
        if not is_local_model(model_id):
            with _warned_lock:
                first = model_id not in _warned
                _warned.add(model_id)
            if first:
                logger.warning(
                    "no price known for model %r; counting its tokens as $0 (give it a price in the trial config's "
                    "budget.prices, e.g. {name: {prompt_per_m: 0.15, completion_per_m: 0.6}})",
                    model_id,
                )
        return 0.0
    return (usage.prompt_tokens * price.prompt_per_m + usage.completion_tokens * price.completion_per_m) / 1e6


class CostLedger:
    """Sums usage per (role, model_id); roles are e.g. ``actor`` and ``reflector``. Safe to share across threads."""

    def __init__(self, prices: dict[str, Price] | None = None) -> None:
        self.prices = DEFAULT_PRICES if prices is None else prices
        self._usage: dict[tuple[str, str], Usage] = {}
        self._lock = threading.Lock()

    def add(self, role: str, model_id: str, usage: Usage) -> None:
        with self._lock:
            self._usage.setdefault((role, model_id), Usage()).add(usage)

    def usage(self, role: str | None = None) -> Usage:
        """Summed usage over all entries, or over one role."""
        total = Usage()
        with self._lock:
            for (r, _), u in self._usage.items():
                if role is None or r == role:
                    total.add(u)
        return total

    @property
    def total_tokens(self) -> int:
        return self.usage().total_tokens

    @property
    def total_usd(self) -> float:
        with self._lock:
            items = list(self._usage.items())
        return sum(usage_cost(model, u, self.prices) for (_, model), u in items)

    def summary(self) -> dict:
        """A JSON-ready summary: totals plus one entry per (role, model)."""
        with self._lock:
            items = sorted(self._usage.items())
        entries = [
            {
                "role": role,
                "model_id": model,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "calls": u.calls,
                "cached_calls": u.cached_calls,
                "usd": round(usage_cost(model, u, self.prices), 6),
            }
            for (role, model), u in items
        ]
        return {
            "total_tokens": sum(e["prompt_tokens"] + e["completion_tokens"] for e in entries),
            "total_usd": round(sum(e["usd"] for e in entries), 6),
            "calls": sum(e["calls"] for e in entries),
            "cached_calls": sum(e["cached_calls"] for e in entries),
            "by_role_model": entries,
        }

    def check(self, max_tokens: int | None = None, max_usd: float | None = None) -> None:
        """Raise :class:`BudgetExceeded` when the totals reached ``max_tokens`` or ``max_usd`` (None: no limit)."""
        if max_tokens is not None and (tokens := self.total_tokens) >= max_tokens:
            raise BudgetExceeded(
                f"token budget reached: {tokens} tokens used, limit {max_tokens}; finished episodes are kept. "
                "Raise the token budget or resume the run to continue"
            )
        if max_usd is not None and (usd := self.total_usd) >= max_usd:
            raise BudgetExceeded(
                f"cost budget reached: ${usd:.4f} spent, limit ${max_usd:.4f} (example prices, see "
                "retroformer.llm.cost); finished episodes are kept. Raise the cost budget or resume the run to continue"
            )


class MeteredLLM(LLM):
    """Wraps ``inner``: calls ``check()`` before each call (it raises :class:`BudgetExceeded` once a budget is spent)
    and ``add(role, model_id, usage)`` after it, so that a budget stops the next call, not the next episode."""

    def __init__(
        self, inner: LLM, role: str, add: Callable[[str, str, Usage], None], check: Callable[[], None]
    ) -> None:
        self.inner = inner
        self.role = role
        self._add = add
        self._check = check

    @property
    def model_id(self) -> str:  # type: ignore[override]
        return self.inner.model_id

    @property
    def style(self) -> str | None:
        return getattr(self.inner, "style", None)

    def __repr__(self) -> str:
        return f"MeteredLLM({self.inner!r}, role={self.role!r})"

    async def generate(self, request: GenerationRequest) -> Completion:
        self._check()
        completion = await self.inner.generate(request)
        self._add(self.role, completion.model_id, completion.usage)
        return completion

    def wind_down(self) -> None:
        self.inner.wind_down()

    async def aclose(self) -> None:
        await self.inner.aclose()
