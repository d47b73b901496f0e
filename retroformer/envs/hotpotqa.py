"""HotPotQA (distractor setting) as a ReAct text environment: ``Search[entity]``, ``Lookup[keyword]``, ``Finish[answer]``.

HotPotQA is the paper's headline environment (Yao et al. 2024, section 5): multi-hop questions answered by a frozen
actor that searches pages, looks up keywords and submits a short answer; the return is exact match (F1 is recorded
too). The protocol follows Reflexion's: 6 actions per episode, up to 5 trials, 100 sampled hard questions.

Questions come from

* a local file: the official JSON (a list of records with ``_id``, ``context`` as ``[title, [sentences]]`` pairs,
  ...), or the Hugging Face layout (``id``, ``context: {title: [...], sentences: [[...]]}``, ...) as JSON, JSON Lines,
  parquet, or a ``datasets.save_to_disk`` folder;
* the Hugging Face Hub through ``datasets.load_dataset`` (``hub_dataset: hotpotqa/hotpot_qa``), for users online;
* by default, a fixture of fictional questions shipped with the package, so that ``env: {name: hotpotqa}`` runs offline.

Pages come from a :class:`Docstore`: the question's own context paragraphs (offline; the default) or live Wikipedia
through the MediaWiki API (``docstore: wikipedia``).

Example::

    suite = make_suite("hotpotqa", {"level": "hard"})
    env = suite.make()
    env.reset(suite.tasks()[0])            # 'In which harbour town was the author of the memoir Salt Ledger born?'
    env.step("Search[Salt Ledger]")        # the page's first sentences
    env.step("Finish[Quillhaven]")         # done; env.outcome() -> Outcome(return_=1.0, success=True, ...)
"""

from __future__ import annotations

import abc
import html
import json
import logging
import random
import re
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any, Literal

from retroformer.config import doc
from retroformer.envs.base import EnvPrompts, EnvSuite, Outcome, StepResult, Task, TextEnv, register_env
from retroformer.envs.hotpotqa_data import prompts as _prompts
from retroformer.errors import ConfigError, DataError, EnvError
from retroformer.types import text_hash

logger = logging.getLogger(__name__)

#: The fictional questions shipped with the package (official schema); the default when no data is configured.
FIXTURE_PATH = Path(__file__).parent / "hotpotqa_data" / "fixture.json"

LEVELS = ("easy", "medium", "hard")
ACTIONS_HELP = "Search[entity], Lookup[keyword], Finish[answer]"
TRUNCATION_MARKER = " [... observation truncated]"
_ACTION_RE = re.compile(r"^\s*(search|lookup|finish)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)
# A sentence ends at . ! or ? followed by whitespace and something that can start a sentence.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_HEADING_RE = re.compile(r"^=+\s*.*?\s*=+$")
_WIKI_CACHE_SIZE = 2048

PROMPTS = EnvPrompts(
    instructions=_prompts.INSTRUCTIONS,
    examples=_prompts.EXAMPLES,
    reflection_instructions=_prompts.REFLECTION_INSTRUCTIONS,
    reflection_examples=_prompts.REFLECTION_EXAMPLES,
)


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
#: Answers that are labels rather than spans: a partial token overlap with them means nothing, so F1 is 0 unless equal.
_LABEL_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, squash whitespace (HotPotQA's answer normal form)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised answers; yes/no/noanswer count only when they match exactly."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _LABEL_ANSWERS or ref in _LABEL_ANSWERS) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------------------------
# Questions and loaders
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HotpotQuestion:
    """One HotPotQA question in a layout-independent form."""

    qid: str
    question: str
    answer: str
    qtype: str
    level: str
    supporting_facts: tuple[tuple[str, int], ...]
    context: tuple[tuple[str, tuple[str, ...]], ...]

    def to_payload(self) -> dict[str, Any]:
        """The task payload (plain JSON data) the environment resets from."""
        return {
            "question": self.question,
            "answer": self.answer,
            "type": self.qtype,
            "level": self.level,
            "supporting_facts": [[t, i] for t, i in self.supporting_facts],
            "context": [[t, list(s)] for t, s in self.context],
        }


def _pairs_from(value: Any, keys: tuple[str, str], where: str, field_name: str) -> list[tuple[Any, Any]]:
    """``[[a, b], ...]`` (official layout) or ``{keys[0]: [a...], keys[1]: [b...]}`` (Hugging Face layout)."""
    if isinstance(value, dict):
        if not all(k in value for k in keys):
            raise DataError(f"{where}: {field_name} has keys {sorted(value)}, expected {list(keys)}")
        firsts, seconds = value[keys[0]], value[keys[1]]
        if len(firsts) != len(seconds):
            raise DataError(f"{where}: {field_name}.{keys[0]} and .{keys[1]} have different lengths")
        return list(zip(firsts, seconds, strict=True))
    if isinstance(value, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        return [(p[0], p[1]) for p in value]
    raise DataError(
        f"{where}: {field_name} is {type(value).__name__}, expected a list of [{keys[0]}, {keys[1]}] pairs (official "
        f"JSON) or a mapping {{{keys[0]}: [...], {keys[1]}: [...]}} (Hugging Face layout)"
    )


def _clean_title(title: Any) -> str:
    return html.unescape(str(title)).strip()


def parse_record(record: dict[str, Any], where: str = "record") -> HotpotQuestion:
    """One question from either layout: official (``_id``, pair lists) or Hugging Face (``id``, dicts of lists)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per question, got {type(record).__name__}")
    qid = record.get("_id", record.get("id"))
    missing = [k for k in ("question", "context") if k not in record]
    if qid is None or missing:
        raise DataError(
            f"{where}: missing {(['_id or id'] if qid is None else []) + missing}; expected a HotPotQA record with "
            "_id/id, question, answer, context (and type, level, supporting_facts)"
        )
    if record.get("answer") is None:
        raise DataError(
            f"{where} (id {qid}): no answer; HotPotQA's test split is unlabelled, use the dev ('validation') split"
        )
    # The real data escapes some titles ("Tom &amp; Jerry", gold ones too), so Search[Tom & Jerry] would miss them.
    context = tuple(
        (_clean_title(title), tuple(str(s).strip() for s in sentences))
        for title, sentences in _pairs_from(record["context"], ("title", "sentences"), where, "context")
    )
    facts = tuple(
        (_clean_title(title), int(idx))
        for title, idx in _pairs_from(
            record.get("supporting_facts", []), ("title", "sent_id"), where, "supporting_facts"
        )
    )
    return HotpotQuestion(
        qid=str(qid),
        question=str(record["question"]).strip(),
        answer=str(record["answer"]),
        qtype=str(record.get("type", "")),
        level=str(record.get("level", "")),
        supporting_facts=facts,
        context=context,
    )


def _rows_from_json(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"HotPotQA data {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); expected the distractor "
            "JSON or JSON Lines in UTF-8 (or a .parquet file): convert it, or point env.options.data_path at another file"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # JSON Lines (what ``Dataset.to_json`` writes): one record per line.
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not JSON nor JSON Lines ({exc}); expected HotPotQA records") from None
        return rows
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("question"), list):
        # Column-oriented (dict of lists, as ``Dataset.to_dict`` gives): transpose to rows.
        n = len(data["question"])
        if any(not isinstance(v, list) or len(v) != n for v in data.values()):
            raise DataError(f"{path}: column-oriented file whose columns have different lengths")
        return [{k: v[i] for k, v in data.items()} for i in range(n)]
    if isinstance(data, dict) and ("_id" in data or "id" in data):
        return [data]
    raise DataError(
        f"{path}: top level is {type(data).__name__}, expected a list of HotPotQA records, JSON Lines, or a mapping "
        "of columns (question: [...], ...)"
    )


def load_questions(path: str | Path) -> list[HotpotQuestion]:
    """Questions from a local file or folder, in file order (see the module docstring for the layouts)."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"HotPotQA data {str(p)!r} does not exist; set env.options.data_path to the distractor JSON/parquet "
            "file, or leave it unset to use the built-in fixture"
        )
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{p} holds splits {list(ds)}; point data_path at one split's folder")
        rows = list(ds)
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    else:
        rows = _rows_from_json(p)
    questions = [parse_record(r, f"{p}[{i}]") for i, r in enumerate(rows)]
    logger.info("loaded %d HotPotQA questions from %s", len(questions), p)
    return questions


def load_hub_questions(dataset: str, config: str, split: str) -> list[HotpotQuestion]:
    """Questions through ``datasets.load_dataset`` (needs the network the first time; cached afterwards)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except (OSError, ConnectionError, ValueError) as exc:  # offline, unknown config/split, or hub errors
        raise DataError(
            f"could not load {dataset!r} (config {config!r}, split {split!r}) from the Hugging Face Hub: {exc}. "
            "Where you are online, save it with `ds.to_parquet('hotpot_dev_distractor.parquet')` and set "
            "env.options.data_path to that file instead of hub_dataset"
        ) from exc
    return [parse_record(r, f"{dataset}[{i}]") for i, r in enumerate(ds)]


# --------------------------------------------------------------------------------------------------------------------
# Docstores
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """A page: its title and its paragraphs, each a tuple of sentences."""

    title: str
    paragraphs: tuple[tuple[str, ...], ...]

    @property
    def sentences(self) -> list[str]:
        return [s for para in self.paragraphs for s in para]

    def summary(self, max_sentences: int) -> str:
        """The first paragraph, cut to its first ``max_sentences`` sentences: what ``Search`` shows."""
        first = self.paragraphs[0] if self.paragraphs else ()
        return " ".join(s.strip() for s in first[:max_sentences])


@dataclass(frozen=True)
class SearchResult:
    """A found page, or no page and the titles closest to what was searched."""

    page: Page | None
    similar: tuple[str, ...] = ()


class Docstore(abc.ABC):
    """Where ``Search`` finds pages. Implementations used by several environments at once must be thread-safe."""

    @abc.abstractmethod
    def search(self, entity: str) -> SearchResult:
        """The page titled ``entity`` (case-insensitive), else the closest titles."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def closest_titles(query: str, titles: Iterable[str], n: int) -> list[str]:
    """The ``n`` titles most similar to ``query``: containment first, then difflib's ratio (case-insensitive)."""
    q = " ".join(query.lower().split())

    def score(title: str) -> float:
        t = title.lower()
        bonus = 1.0 if q and (q in t or t in q) else 0.0
        return bonus + SequenceMatcher(None, q, t).ratio()

    return sorted(titles, key=lambda t: (-score(t), t))[:n]


class ContextDocstore(Docstore):
    """The question's own context paragraphs (distractor setting): each paragraph is a page; offline."""

    def __init__(self, context: Iterable[tuple[str, Iterable[str]]], num_similar: int) -> None:
        self.pages: dict[str, Page] = {}
        for title, sentences in context:
            # HotPotQA paragraphs are the lead paragraphs of their pages, so a page has one paragraph.
            self.pages.setdefault(" ".join(title.lower().split()), Page(title, (tuple(sentences),)))
        self.num_similar = num_similar

    def search(self, entity: str) -> SearchResult:
        page = self.pages.get(" ".join(entity.lower().split()))
        if page is not None:
            return SearchResult(page)
        titles = [p.title for p in self.pages.values()]
        return SearchResult(None, tuple(closest_titles(entity, titles, self.num_similar)))


def split_sentences(paragraph: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in _SENTENCE_END_RE.split(paragraph) if s.strip())


def split_page(text: str) -> tuple[tuple[str, ...], ...]:
    """Plain-text page (a MediaWiki extract) -> paragraphs of sentences, without section headings."""
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not _HEADING_RE.match(line):
            paragraphs.append(split_sentences(line))
    return tuple(paragraphs)


class WikipediaDocstore(Docstore):
    """Live pages through the MediaWiki API (``prop=extracts`` for a page, ``list=search`` for similar titles).

    A search first asks for the page by title (MediaWiki resolves redirects and the first letter's case); on a miss it
    runs a full-text search, opens a hit whose title matches case-insensitively, and otherwise lists the hits as
    similar titles. Results are cached; the HTTP client is shared by all environments of a suite (httpx clients are
    thread-safe). Timeouts, connection errors, 429 and 5xx are retried with exponential backoff.
    """

    def __init__(
        self,
        api_url: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        user_agent: str,
        num_similar: int,
    ) -> None:
        self.api_url = api_url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.user_agent = user_agent
        self.num_similar = num_similar
        self._client: Any = None
        self._lock = threading.Lock()
        self._cache: dict[str, SearchResult] = {}

    def _http(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout_s, headers={"User-Agent": self.user_agent})
            return self._client

    def _get(self, params: dict[str, Any]) -> dict[str, Any]:
        import httpx

        client = self._http()
        query = {**params, "format": "json", "formatversion": "2"}
        failure = ""
        for attempt in range(self.retries + 1):
            try:
                resp = client.get(self.api_url, params=query)
            except httpx.TransportError as exc:  # timeouts and connection errors
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    failure = f"HTTP {resp.status_code}"
                elif resp.status_code != 200:
                    raise EnvError(
                        f"MediaWiki API {self.api_url} answered HTTP {resp.status_code} to {params}; expected 200. "
                        "Check env.options.wikipedia_api_url (it must end in api.php)"
                    )
                else:
                    try:
                        data = resp.json()
                    except ValueError:
                        raise EnvError(
                            f"MediaWiki API {self.api_url} did not answer JSON (got {resp.text[:80]!r}); "
                            "check env.options.wikipedia_api_url"
                        ) from None
                    if "error" in data:
                        raise EnvError(f"MediaWiki API error for {params}: {data['error']}")
                    return data
            if attempt < self.retries:
                delay = self.backoff_s * 2**attempt
                logger.warning("MediaWiki API %s: %s; retry %d in %.1fs", self.api_url, failure, attempt + 1, delay)
                time.sleep(delay)
        raise EnvError(
            f"MediaWiki API {self.api_url} failed {self.retries + 1} times ({failure}); check the network, raise "
            "env.options.wikipedia_retries, or use env.options.docstore=context (offline)"
        )

    def _page(self, title: str) -> Page | None:
        data = self._get({"action": "query", "prop": "extracts", "explaintext": 1, "redirects": 1, "titles": title})
        for page in data.get("query", {}).get("pages", []):
            if page.get("missing") or page.get("invalid"):
                continue
            paragraphs = split_page(page.get("extract") or "")
            if paragraphs:
                return Page(page.get("title", title), paragraphs)
        return None

    def _search_titles(self, query: str) -> list[str]:
        data = self._get(
            {"action": "query", "list": "search", "srsearch": query, "srlimit": self.num_similar, "srprop": ""}
        )
        return [hit["title"] for hit in data.get("query", {}).get("search", [])]

    @staticmethod
    def _is_disambiguation(page: Page) -> bool:
        return bool(page.paragraphs) and page.paragraphs[0][-1].rstrip().endswith("may refer to:")

    def search(self, entity: str) -> SearchResult:
        key = " ".join(entity.lower().split())
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        page = self._page(entity.strip())
        hits: list[str] = []
        if page is None or self._is_disambiguation(page):
            hits = self._search_titles(entity.strip())
            exact = next((h for h in hits if h.lower() == key and (page is None or h != page.title)), None)
            page = self._page(exact) if exact else None
        result = SearchResult(page) if page is not None else SearchResult(None, tuple(hits))
        with self._lock:
            if len(self._cache) >= _WIKI_CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = result
        return result

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


# --------------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------------


class HotpotQAEnv(TextEnv):
    """One question at a time; see the module docstring for the actions and observations."""

    def __init__(self, config: HotpotQASuite.Config, docstore_for: Callable[[Task], Docstore]) -> None:
        self.config = config
        self.docstore_for = docstore_for
        self.task: Task | None = None
        self.docstore: Docstore | None = None

    def reset(self, task: Task) -> str:
        self.task = task
        self.docstore = self.docstore_for(task)
        self.page: Page | None = None
        self.lookup_keyword: str | None = None
        self.lookup_matches: list[str] = []
        self.lookup_next = 0
        self.answer: str | None = None
        self.steps = 0
        self.done = False
        return str(task.payload["question"])

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise EnvError("HotpotQAEnv.step() called before reset(); reset the environment to a task first")
        if self.done:
            return StepResult("The episode is over; no more actions are accepted.", done=True, info={"invalid": True})
        self.steps += 1
        result = self._apply(action)
        result.observation = self._truncate(result.observation)
        if not result.done and self.steps >= self.config.max_steps:
            # The actor's step budget (Reflexion protocol: 6) is enforced here too, so the env ends the same way
            # whether it is driven by the trial loop or directly.
            result.observation += (
                f" Step limit reached: {self.config.max_steps} actions without Finish[answer]; the episode ends."
            )
            result.done = True
            result.info["end_reason"] = "step_limit"
        self.done = result.done
        return result

    def _truncate(self, text: str) -> str:
        limit = self.config.max_observation_chars
        if len(text) <= limit:
            return text
        return text[: max(0, limit - len(TRUNCATION_MARKER))].rstrip() + TRUNCATION_MARKER

    def _apply(self, action: str) -> StepResult:
        match = _ACTION_RE.match(action or "")
        if not match:
            return StepResult(
                f"Invalid action: {action.strip()!r}. Valid actions are {ACTIONS_HELP}.", info={"invalid": True}
            )
        verb, arg = match.group(1).lower(), " ".join(match.group(2).split())
        if not arg:
            return StepResult(
                f"Invalid action: {verb.capitalize()}[] needs an argument. Valid actions are {ACTIONS_HELP}.",
                info={"invalid": True},
            )
        if verb == "search":
            return self._search(arg)
        if verb == "lookup":
            return self._lookup(arg)
        return self._finish(arg)

    def _search(self, entity: str) -> StepResult:
        assert self.docstore is not None
        result = self.docstore.search(entity)
        if result.page is None:
            # A miss keeps the last page found: Lookup still works on it.
            return StepResult(f"Could not find [{entity}]. Similar: {list(result.similar)}")
        self.page = result.page
        self.lookup_keyword, self.lookup_matches, self.lookup_next = None, [], 0
        return StepResult(result.page.summary(self.config.search_sentences))

    def _lookup(self, keyword: str) -> StepResult:
        if self.page is None:
            return StepResult(f"No page to look up [{keyword}] in yet: use Search[entity] to open a page first.")
        if keyword.lower() != (self.lookup_keyword or "").lower():
            self.lookup_keyword = keyword
            self.lookup_matches = [s for s in self.page.sentences if keyword.lower() in s.lower()]
            self.lookup_next = 0
        n = len(self.lookup_matches)
        if n == 0:
            return StepResult(f"No results for [{keyword}] on the page [{self.page.title}].")
        if self.lookup_next >= n:
            return StepResult(f"No more results for [{keyword}] on the page [{self.page.title}] ({n} shown).")
        sentence = self.lookup_matches[self.lookup_next]
        self.lookup_next += 1
        return StepResult(f"(Result {self.lookup_next} / {n}) {sentence}")

    def _finish(self, answer: str) -> StepResult:
        assert self.task is not None
        self.answer = answer
        correct = exact_match(answer, self.task.payload["answer"]) == 1.0
        verdict = "CORRECT" if correct else "INCORRECT"
        return StepResult(f"Answer [{answer}] is {verdict}.", reward=self._return(), done=True)

    def _return(self) -> float:
        assert self.task is not None
        if self.answer is None:
            return 0.0
        score = exact_match if self.config.reward == "em" else f1_score
        return score(self.answer, self.task.payload["answer"])

    def outcome(self) -> Outcome:
        if self.task is None:
            raise EnvError("HotpotQAEnv.outcome() called before reset()")
        gold = self.task.payload["answer"]
        em = exact_match(self.answer, gold) if self.answer is not None else 0.0
        f1 = f1_score(self.answer, gold) if self.answer is not None else 0.0
        return Outcome(
            return_=self._return(),
            success=em == 1.0,
            metrics={"em": em, "f1": f1, "answered": float(self.answer is not None), "steps": float(self.steps)},
        )


# --------------------------------------------------------------------------------------------------------------------
# Suite
# --------------------------------------------------------------------------------------------------------------------


def select_questions(
    questions: list[HotpotQuestion],
    *,
    task_ids: list[str],
    level: str | None,
    start: int,
    stop: int | None,
    sample: int | None,
    sample_seed: int,
) -> list[HotpotQuestion]:
    """Filter by level, then pick by ids, or slice ``[start:stop]`` and draw a seeded sample (kept in data order)."""
    duplicates = [qid for qid, count in Counter(q.qid for q in questions).items() if count > 1]
    if duplicates:
        raise DataError(f"HotPotQA data has duplicate ids {sorted(duplicates)[:5]}; ids must be unique")
    if level is not None:
        present = sorted({q.level for q in questions})
        questions = [q for q in questions if q.level == level]
        if not questions:
            raise DataError(f"no question has level {level!r}; levels in the data: {present}")
    if task_ids:
        by_id = {q.qid: q for q in questions}
        unknown = [t for t in task_ids if t not in by_id]
        if unknown:
            raise DataError(
                f"task ids {unknown[:5]} are not in the data{' at level ' + repr(level) if level else ''}; "
                f"example ids: {list(by_id)[:3]}"
            )
        return [by_id[t] for t in task_ids]
    questions = questions[start:stop]
    if sample is not None:
        if sample > len(questions):
            raise DataError(
                f"env.options.sample={sample} but only {len(questions)} questions remain after the level filter and "
                "slice; lower sample, widen the selection, or set data_path / hub_dataset to the full data (unset, "
                "the small built-in fixture is used)"
            )
        # Sorting the sampled indices keeps data order, so the same seed gives the same ordered task list.
        picked = sorted(random.Random(sample_seed).sample(range(len(questions)), sample))
        questions = [questions[i] for i in picked]
    if not questions:
        raise DataError(f"the selection start={start}, stop={stop} is empty; widen it")
    return questions


@register_env("hotpotqa")
class HotpotQASuite(EnvSuite):
    """HotPotQA distractor questions with Search / Lookup / Finish; see the module docstring."""

    version = "1"
    prompts = PROMPTS

    @dataclass
    class Config:
        # --- data ---
        data_path: str | None = doc(
            "local HotPotQA data: official JSON (list of records), Hugging Face layout as JSON/JSONL/parquet, or a "
            "datasets.save_to_disk folder; unset (and no hub_dataset): the fictional fixture shipped with the package",
            None,
        )
        hub_dataset: str | None = doc(
            "Hugging Face dataset id loaded with datasets.load_dataset (needs the network), e.g. hotpotqa/hotpot_qa",
            None,
        )
        hub_config: str = doc("configuration of hub_dataset: the paper uses the distractor setting", "distractor")
        split: str = doc("split of hub_dataset; the paper samples from the dev set ('validation' on the Hub)",
                         "validation")  # fmt: skip
        # --- task selection (the selected ids define the task fingerprint) ---
        level: str | None = doc("keep only this level: easy, medium or hard (the paper: hard)", None)
        task_ids: list[str] = doc("explicit question ids, in this order (excludes start/stop/sample)",
                                  default_factory=list)  # fmt: skip
        start: int = doc("first question of the slice [start:stop] (after the level filter)", 0)
        stop: int | None = doc("end of the slice [start:stop]; unset: to the end", None)
        sample: int | None = doc("draw this many questions from the slice with sample_seed (the paper: 100)", None)
        sample_seed: int = doc("seed of the sample", 0)
        # --- pages ---
        docstore: Literal["context", "wikipedia"] = doc(
            "where Search finds pages: context (the question's own paragraphs, offline) or wikipedia (live "
            "MediaWiki API)",
            "context",
        )
        search_sentences: int = doc("Search shows at most this many sentences of the page's first paragraph", 5)
        num_similar: int = doc("titles listed after 'Could not find [X]. Similar:'", 5)
        wikipedia_api_url: str = doc("MediaWiki API endpoint", "https://en.wikipedia.org/w/api.php")
        wikipedia_timeout_s: float = doc("per-request timeout of the MediaWiki API, in seconds", 10.0)
        wikipedia_retries: int = doc("retries on timeouts, connection errors, 429 and 5xx", 3)
        wikipedia_backoff_s: float = doc("first retry delay in seconds; doubles with each retry", 1.0)
        wikipedia_user_agent: str = doc(
            "User-Agent sent to the MediaWiki API (Wikimedia asks for a descriptive one with contact details)",
            "retroformer-hotpotqa/0.1 (research)",
        )
        # --- episode ---
        max_steps: int = doc("actions per episode (Reflexion's HotPotQA protocol: 6)", 6)
        max_observation_chars: int = doc("longer observations are cut, with a marker, to bound the prompt", 1000)
        reward: Literal["em", "f1"] = doc("episode return: exact match (the paper) or token F1; both are recorded",
                                          "em")  # fmt: skip

        def __post_init__(self) -> None:
            if self.data_path is not None and self.hub_dataset is not None:
                raise ConfigError(
                    f"env.options.data_path={self.data_path!r} and hub_dataset={self.hub_dataset!r} are both set; "
                    "set only one"
                )
            if self.level is not None and self.level not in LEVELS:
                raise ConfigError(f"env.options.level must be one of {list(LEVELS)} or unset, got {self.level!r}")
            if self.task_ids and (self.sample is not None or self.start != 0 or self.stop is not None):
                raise ConfigError("env.options.task_ids cannot be combined with start/stop/sample; pick tasks one way")
            if self.start < 0 or (self.stop is not None and self.stop < self.start):
                raise ConfigError(f"env.options.start={self.start}, stop={self.stop}: need 0 <= start <= stop")
            if self.sample is not None and self.sample < 1:
                raise ConfigError(f"env.options.sample must be >= 1 or unset, got {self.sample}")
            for name in ("max_steps", "max_observation_chars", "search_sentences", "num_similar"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"env.options.{name} must be >= 1, got {getattr(self, name)}")
            if self.max_observation_chars < 2 * len(TRUNCATION_MARKER):
                raise ConfigError(
                    f"env.options.max_observation_chars={self.max_observation_chars} leaves no room for text; use "
                    f">= {2 * len(TRUNCATION_MARKER)}"
                )
            if self.wikipedia_retries < 0 or self.wikipedia_timeout_s <= 0 or self.wikipedia_backoff_s < 0:
                raise ConfigError(
                    f"env.options.wikipedia_retries={self.wikipedia_retries} (>= 0), wikipedia_timeout_s="
                    f"{self.wikipedia_timeout_s} (> 0), wikipedia_backoff_s={self.wikipedia_backoff_s} (>= 0)"
                )

    def __init__(self, config: HotpotQASuite.Config) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._tasks: list[Task] | None = None
        self._wikipedia: WikipediaDocstore | None = None

    def load(self) -> list[HotpotQuestion]:
        """All questions of the configured source (before selection)."""
        cfg = self.config
        if cfg.hub_dataset is not None:
            return load_hub_questions(cfg.hub_dataset, cfg.hub_config, cfg.split)
        if cfg.data_path is None:
            logger.info("no data_path or hub_dataset: using the built-in fixture of fictional questions")
            return load_questions(FIXTURE_PATH)
        return load_questions(cfg.data_path)

    def tasks(self) -> list[Task]:
        with self._lock:
            if self._tasks is None:
                cfg = self.config
                selected = select_questions(
                    self.load(),
                    task_ids=cfg.task_ids,
                    level=cfg.level,
                    start=cfg.start,
                    stop=cfg.stop,
                    sample=cfg.sample,
                    sample_seed=cfg.sample_seed,
                )
                self._tasks = [Task(q.qid, q.to_payload()) for q in selected]
            return list(self._tasks)

    def make(self) -> TextEnv:
        return HotpotQAEnv(self.config, self._docstore_for)

    def _docstore_for(self, task: Task) -> Docstore:
        cfg = self.config
        if cfg.docstore == "context":
            return ContextDocstore(task.payload["context"], cfg.num_similar)
        with self._lock:
            if self._wikipedia is None:
                self._wikipedia = WikipediaDocstore(
                    cfg.wikipedia_api_url,
                    timeout_s=cfg.wikipedia_timeout_s,
                    retries=cfg.wikipedia_retries,
                    backoff_s=cfg.wikipedia_backoff_s,
                    user_agent=cfg.wikipedia_user_agent,
                    num_similar=cfg.num_similar,
                )
            return self._wikipedia

    def fingerprint(self, tasks: list[Task]) -> str:
        # The docstore and the reward change what a return means, so they are part of the task identity too.
        cfg = self.config
        return text_hash("\n".join([self.name, self.version, cfg.docstore, cfg.reward, *[t.task_id for t in tasks]]))

    def close(self) -> None:
        with self._lock:
            if self._wikipedia is not None:
                self._wikipedia.close()
                self._wikipedia = None


def corpus() -> list[str]:
    """Prompt and fixture text for the tiny tokenizer (offline, reads only the packaged fixture)."""
    texts = [PROMPTS.instructions, PROMPTS.examples, PROMPTS.reflection_instructions, PROMPTS.reflection_examples]
    for q in load_questions(FIXTURE_PATH):
        texts.append(q.question)
        texts.append(f"Action: Finish[{q.answer}]")
        texts.extend(" ".join(sentences) for _, sentences in q.context)
        titles = [t for t, _ in q.context]
        texts.append(f"Action: Search[{titles[0]}]\nObservation: Could not find [{titles[0]}]. Similar: {titles[:3]}")
    return texts
