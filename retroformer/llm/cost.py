"""Token cost accounting: a price table, ``usage_cost``, and a :class:`CostLedger` per (role, model) with a budget.

The default prices are EXAMPLES, in US dollars per million tokens, copied from public price lists at one point in
time; providers change them. Check them against your provider before trusting a dollar figure, and pass your own
table (``budget.prices`` in a trial config; ``CostLedger(prices=...)`` / ``usage_cost(..., prices=...)``) where they
differ. Dated snapshots (``gpt-4o-mini-2024-07-18``) cost what their model costs. Local models (in-process,
scripted, or served from a local address) cost 0; an unknown remote model costs 0 with a warning, once per model.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
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


#: Tokens a chat template may add around a prompt (role markers, separators), on top of the prompt's own.
TEMPLATE_TOKENS = 32


def worst_case_usage(request: GenerationRequest) -> Usage:
    """The most tokens one call of ``request`` can use: its prompt at one token per UTF-8 byte (a byte-level
    tokenizer makes no more), plus :data:`TEMPLATE_TOKENS`, plus ``max_tokens`` of completion."""
    prompt = len(request.prompt.encode()) + len((request.system or "").encode()) + TEMPLATE_TOKENS
    return Usage(prompt_tokens=prompt, completion_tokens=request.params.max_tokens)


class Budget:
    """Limits on a :class:`CostLedger` that hold with many calls in flight: each call reserves its worst case
    (:func:`worst_case_usage` at its model's price) before it is sent and settles it on its reply (the reservation
    released, the real usage added). A call whose worst case does not fit waits while others are in flight (their
    replies may leave room); with none in flight it raises :class:`BudgetExceeded`, and the budget is spent. So the
    totals never pass ``max_tokens`` or ``max_usd``, at the price of stopping up to one call's worst case early.
    For one event loop at a time."""

    def __init__(self, ledger: CostLedger, max_tokens: int | None = None, max_usd: float | None = None) -> None:
        self.ledger = ledger
        self.max_tokens = max_tokens
        self.max_usd = max_usd
        self.reserved_tokens = 0
        self.reserved_usd = 0.0
        self.in_flight = 0
        #: Why the budget cannot take another call, once it cannot.
        self.spent: str | None = None
        self._released: asyncio.Event | None = None

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` once the totals reached a limit, or a call's worst case no longer fit."""
        if self.spent is not None:
            raise BudgetExceeded(self.spent)
        self.ledger.check(self.max_tokens, self.max_usd)

    def _fits(self, tokens: int, usd: float) -> bool:
        ok_tokens = (
            self.max_tokens is None or self.ledger.total_tokens + self.reserved_tokens + tokens <= self.max_tokens
        )
        ok_usd = self.max_usd is None or self.ledger.total_usd + self.reserved_usd + usd <= self.max_usd
        return ok_tokens and ok_usd

    async def reserve(self, role: str, model_id: str, worst: Usage) -> None:
        """Hold ``worst`` against the limits until :meth:`settle`; wait for room, or raise :class:`BudgetExceeded`."""
        self.check()
        if self.max_tokens is None and self.max_usd is None:
            return
        tokens, usd = worst.total_tokens, usage_cost(model_id, worst, self.ledger.prices)
        while not self._fits(tokens, usd):
            if self.in_flight == 0:
                self.spent = (
                    f"budget reached: the next {role} call could use {tokens} tokens (${usd:.4f}) at most, more than "
                    f"is left ({self.ledger.total_tokens} tokens, ${self.ledger.total_usd:.4f} spent; limits "
                    f"{self.max_tokens} tokens, ${self.max_usd}); finished episodes are kept. Raise the budget or "
                    "resume the run to continue"
                )
                raise BudgetExceeded(self.spent)
            if self._released is None:
                self._released = asyncio.Event()
            self._released.clear()
            await self._released.wait()
        self.reserved_tokens += tokens
        self.reserved_usd += usd
        self.in_flight += 1

    def settle(self, role: str, model_id: str, worst: Usage, used: Usage | None) -> None:
        """Release the reservation of ``worst`` and add ``used`` (None: the call failed and used nothing known)."""
        if used is not None:
            self.ledger.add(role, model_id, used)
        if self.max_tokens is None and self.max_usd is None:
            return
        self.reserved_tokens -= worst.total_tokens
        self.reserved_usd -= usage_cost(model_id, worst, self.ledger.prices)
        self.in_flight -= 1
        if self._released is not None:
            self._released.set()


class MeteredLLM(LLM):
    """Wraps ``inner``: each call reserves its worst case in ``budget`` before it is sent (it raises
    :class:`BudgetExceeded` once the budget cannot take it) and settles it with the real usage on the reply, so that
    a budget holds with calls in flight and stops the next call, not the next episode."""

    def __init__(self, inner: LLM, role: str, budget: Budget) -> None:
        self.inner = inner
        self.role = role
        self.budget = budget

    @property
    def model_id(self) -> str:  # type: ignore[override]
        return self.inner.model_id

    @property
    def style(self) -> str | None:
        return getattr(self.inner, "style", None)

    def __repr__(self) -> str:
        return f"MeteredLLM({self.inner!r}, role={self.role!r})"

    async def generate(self, request: GenerationRequest) -> Completion:
        worst = worst_case_usage(request)
        await self.budget.reserve(self.role, self.model_id, worst)
        completion = None
        try:
            completion = await self.inner.generate(request)
            return completion
        finally:
            model_id = completion.model_id if completion is not None else self.model_id
            self.budget.settle(self.role, model_id, worst, completion.usage if completion is not None else None)

    def wind_down(self) -> None:
        self.inner.wind_down()

    async def aclose(self) -> None:
        await self.inner.aclose()
