"""WebShop (Yao et al., 2022): buy the product an instruction describes, on a web shop served over HTTP.

The client speaks the WebShop server's protocol: it requests the server's routes and turns each HTML page into the
text the actor reads. Point it at a real WebShop server with ``env.options.url`` (the scripts fill it from
``WEBSHOP_URL``); with ``url: null`` the suite starts our small compatible server
(:mod:`retroformer.envs.webshop_server`, an invented catalog) on 127.0.0.1 for the run and stops it at the end.

Observation format (one item per line)::

    [Back to Search]                  buttons in brackets
    Page 1 (Total results: 4)         other visible text, one line each
    [Next >]
    [B0WS100001]                      product ids, clickable
    Tidewater Ceramic Coffee Mug, ...
    $14.99

On a product page each option value is bracketed (``[16 oz]``), a selected one doubly (``[[16 oz]]``). The
instruction is shown on the start page only (it is the actor's ``Task:`` line); a page with a search box ends with
``[Search]``.

Actions: ``search[<query>]`` (only where there is a search box), ``click[<button, product id or option value>]``
(case-insensitive), ``think[<note>]`` (answers ``OK.``). Anything else, or a click on something the page does not
show, answers ``Invalid action!`` and is marked invalid. ``click[Buy Now]`` ends the episode; the done page shows
``Your score (min 0.0, max 1.0)`` and, in an element of its own (as the real server renders it), ``<r>``.
Return = r in [0, 1]; success = r == 1.0 (paper section 4).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

from retroformer.config import doc
from retroformer.envs.base import EnvPrompts, EnvSuite, Outcome, StepResult, Task, TextEnv, register_env
from retroformer.errors import ConfigError, EnvError
from retroformer.types import text_hash

logger = logging.getLogger(__name__)

INVALID = "Invalid action!"
SUB_PAGES = ("Description", "Features", "Reviews", "Attributes")
#: How many sessions a real server is asked for when ``num_sessions`` is null (the paper's protocol: 100 goals).
PAPER_NUM_SESSIONS = 100
_SCORE_RE = re.compile(r"Your score \(min 0\.0, max 1\.0\)\s*:?\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)")
_ACTION_RE = re.compile(r"^(\w+)\s*\[(.*)\]$", re.DOTALL)


# ---------------------------------------------------------------------------------------------------- HTML -> text


@dataclass
class Item:
    """One visible piece of a page. ``kind``: text, button, product, option or instruction."""

    kind: str
    text: str
    group: str = ""  # option group (radio name) for options
    checked: bool = False  # option marked checked in the HTML


@dataclass
class Page:
    items: list[Item] = field(default_factory=list)
    has_search: bool = False


class _PageParser(HTMLParser):
    """Collects visible text: buttons, product links (class ``product-link``), option labels, plain text."""

    _SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._skip_depth = 0
        self._capture: tuple[str, Item] | None = None  # (closing tag, item being filled)
        self._capture_depth = 0
        self._radios: dict[str, tuple[str, bool]] = {}  # radio id -> (name, checked)
        self._last_radio: tuple[str, bool] | None = None
        self._instruction_depth = 0  # >0 while inside #instruction-text
        self._depth_stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag in self._SKIP:
            self._skip_depth += 1
            return
        if tag == "input":
            kind = a.get("type", "text").lower()
            if a.get("name") == "search_query" or (kind in ("text", "search") and "search" in a.get("name", "")):
                self.page.has_search = True
            if kind == "radio":
                radio = (a.get("name", ""), "checked" in a)
                self._last_radio = radio
                if a.get("id"):
                    self._radios[a["id"]] = radio
            return
        if tag in ("br", "img", "hr", "link", "meta"):
            return
        self._depth_stack.append(tag)
        if a.get("id") == "instruction-text" or self._instruction_depth:
            self._instruction_depth += 1
        if self._capture is not None:
            if tag == self._capture[0]:
                self._capture_depth += 1
            return
        if tag == "button":
            self._capture = ("button", Item("button", ""))
        elif tag == "a" and "product-link" in a.get("class", "").split():
            self._capture = ("a", Item("product", ""))
        elif tag == "label":
            name, checked = self._radios.get(a.get("for", ""), self._last_radio or ("", False))
            self._capture = ("label", Item("option", "", group=name, checked=checked))
        self._capture_depth = 1 if self._capture else 0

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
            return
        if tag in ("input", "br", "img", "hr", "link", "meta"):
            return
        if self._depth_stack and self._depth_stack[-1] == tag:
            self._depth_stack.pop()
            if self._instruction_depth:
                self._instruction_depth -= 1
        if self._capture is not None and tag == self._capture[0]:
            self._capture_depth -= 1
            if self._capture_depth == 0:
                item = self._capture[1]
                item.text = " ".join(item.text.split())
                if item.text:
                    self.page.items.append(item)
                self._capture = None

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._capture is not None:
            self._capture[1].text += data
            return
        text = " ".join(data.split())
        if text:
            self.page.items.append(Item("instruction" if self._instruction_depth else "text", text))


def parse_page(html_text: str) -> Page:
    """The visible items of a WebShop page, in document order."""
    parser = _PageParser()
    parser.feed(html_text)
    parser.close()
    return parser.page


def render(page: Page, selected: dict[str, str], show_instruction: bool) -> str:
    """The observation text of ``page`` (see the module docstring for the format)."""
    lines = []
    for item in page.items:
        if item.kind == "instruction" and not show_instruction:
            continue
        if item.kind == "option":
            is_selected = selected.get(item.group) == item.text if item.group else item.text in selected.values()
            lines.append(f"[[{item.text}]]" if is_selected or (item.checked and not selected) else f"[{item.text}]")
        elif item.kind in ("button", "product"):
            lines.append(f"[{item.text}]")
        else:
            lines.append(item.text)
    return "\n".join(lines)


def parse_score(text: str) -> float | None:
    """The score on a done page, or None when the page shows none."""
    match = _SCORE_RE.search(text)
    return float(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------- prompts

_EXAMPLE_INSTRUCTION = (
    "i need a bamboo cutting board with a juice groove, large size, and price lower than 40.00 dollars"
)

#: A tiny invented catalog behind the few-shot example; tests replay the example against it to keep the two in step.
EXAMPLE_CATALOG: dict[str, Any] = {
    "products": [
        {
            "asin": "B0EX000001",
            "title": "Oakline Bamboo Cutting Board with Juice Groove",
            "category": ["kitchen", "cutting boards"],
            "query": "bamboo cutting board",
            "price": 24.99,
            "rating": 4.4,
            "attributes": ["juice groove", "bamboo"],
            "options": {"size": ["medium", "large"]},
            "description": "A bamboo board with a deep groove that catches juice.",
            "features": ["Solid bamboo", "Juice groove on one side"],
            "reviews": [{"score": 4, "title": "Sturdy", "body": "Does not slide on the counter."}],
        },
        {
            "asin": "B0EX000002",
            "title": "Oakline Bamboo Serving Tray",
            "category": ["kitchen", "serving"],
            "query": "bamboo tray",
            "price": 18.0,
            "rating": 4.0,
            "attributes": ["bamboo"],
            "options": {},
            "description": "A light bamboo tray.",
            "features": ["Solid bamboo"],
            "reviews": [],
        },
    ],
    "goals": [
        {
            "asin": "B0EX000001",
            "instruction_text": _EXAMPLE_INSTRUCTION,
            "attributes": ["juice groove"],
            "goal_options": {"size": "large"},
            "price_upper": 40.0,
        }
    ],
}

_EX_START = f"WebShop\nInstruction:\n{_EXAMPLE_INSTRUCTION}\n[Search]"
_EX_RESULTS = (
    "[Back to Search]\nPage 1 (Total results: 2)\n[Next >]\n"
    "[B0EX000001]\nOakline Bamboo Cutting Board with Juice Groove\n$24.99\n"
    "[B0EX000002]\nOakline Bamboo Serving Tray\n$18.00"
)
_EX_ITEM = (
    "[Back to Search]\n[< Prev]\nsize\n[medium]\n[large]\n"
    "Oakline Bamboo Cutting Board with Juice Groove\nPrice: $24.99\nRating: 4.4\n"
    "[Description]\n[Features]\n[Reviews]\n[Attributes]\n[Buy Now]"
)
#: The actions of the few-shot example, with the observation each one gets (replayed by the tests).
EXAMPLE_STEPS: list[tuple[str, str, str]] = [
    (
        "I need a large bamboo cutting board with a juice groove under 40 dollars. I search for it.",
        "search[bamboo cutting board juice groove]",
        _EX_RESULTS,
    ),
    ("B0EX000001 is a cutting board with a juice groove for $24.99, under 40 dollars.", "click[B0EX000001]", _EX_ITEM),
    (
        "The instruction asks for the large size, so I select it before buying.",
        "click[large]",
        "You have clicked large.",
    ),
    ("Size is set and the price fits. I buy it.", "click[Buy Now]", "__DONE__"),
]
_EX_DONE = (
    "Thank you for shopping with us!\nPurchased: B0EX000001\nOptions: size: large\nYour score (min 0.0, max 1.0)\n1"
)


def _example_text() -> str:
    lines = [f"Task: {_EX_START}"]
    for thought, action, observation in EXAMPLE_STEPS:
        obs = _EX_DONE if observation == "__DONE__" else observation
        lines += [f"Thought: {thought}", f"Action: {action}", f"Observation: {obs}"]
    return "\n".join(lines) + "\n"


PROMPTS = EnvPrompts(
    instructions=(
        "You are shopping on a web shop for the product that the instruction describes. Each page is shown as lines "
        "of text. Things you can click are in brackets: buttons such as [Buy Now], [Back to Search], [< Prev] and "
        "[Next >], product ids such as [B0EX000001], and option values such as [large]; a selected option is shown "
        "as [[large]]. Each turn, write one Thought and one Action. Actions: search[<query>] (only on a page that "
        "shows [Search]), click[<text in brackets>], think[<note>]. Open a product to see its options, select every "
        "option the instruction asks for, check the price, then click[Buy Now]. Buying ends the episode; it is "
        "scored from 0 to 1 by how well the product type, its attributes, the selected options and the price match "
        "the instruction."
    ),
    examples=_example_text(),
    reflection_instructions=(
        "You bought a product on a web shop and did not get the full score. Read the instruction and your "
        "trajectory. In two or three sentences, say what went wrong (wrong product, a missing or wrong option, a "
        "price over the limit, running out of steps) and give a concrete plan for the next attempt: what to search "
        "for, which product id to open and which options to click before [Buy Now]."
    ),
    reflection_examples=(
        f"Task: {_EX_START}\n"
        "Trajectory:\n"
        "Thought: I search for the cutting board.\n"
        "Action: search[bamboo cutting board juice groove]\n"
        f"Observation: {_EX_RESULTS}\n"
        "Thought: B0EX000001 matches and costs $24.99.\n"
        "Action: click[B0EX000001]\n"
        f"Observation: {_EX_ITEM}\n"
        "Thought: It looks right. I buy it.\n"
        "Action: click[Buy Now]\n"
        "Observation: Thank you for shopping with us!\nPurchased: B0EX000001\nOptions: none\n"
        "Your score (min 0.0, max 1.0)\n0.6667\n"
        "Result: return 0.6667, failed\n"
        "Reflection: I opened the right board but bought it without choosing a size, so the size option did not "
        "match. Next time I will search[bamboo cutting board juice groove], click[B0EX000001], click[large] and only "
        "then click[Buy Now].\n"
    ),
)


def corpus() -> list[str]:
    """Prompt text and the built-in catalog's text, for the tiny tokenizer (offline, no server)."""
    from retroformer.envs.webshop_server import load_catalog

    catalog = load_catalog()
    texts = [PROMPTS.instructions, PROMPTS.examples, PROMPTS.reflection_instructions, PROMPTS.reflection_examples]
    for goal in catalog.goals:
        texts.append(f"WebShop\nInstruction:\n{goal.instruction_text}\n[Search]")
    for p in catalog.products:
        options = "\n".join(f"{g}\n" + "\n".join(f"[{v}]" for v in vs) for g, vs in p.options.items())
        texts.append(f"[{p.asin}]\n{p.title}\n${p.price:.2f}\n{options}\n{p.description}\n" + "\n".join(p.features))
    return texts


# ---------------------------------------------------------------------------------------------------- client


class WebShopEnv(TextEnv):
    """One WebShop session driven over HTTP. Not thread-safe (one instance per concurrent episode)."""

    def __init__(self, url: str, timeout_s: float, max_retries: int, retry_backoff_s: float) -> None:
        import httpx

        self.base = url.rstrip("/")
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=True)
        self.session = ""
        self._reset_state()

    def _reset_state(self) -> None:
        self.page_type = "start"  # start | results | item | sub | done
        self.query = ""
        self.page_num = 1
        self.asin = ""
        self.options: dict[str, str] = {}
        self.page = Page()
        self.score: float | None = None
        self.done = False

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _url(self, *segments: Any) -> str:
        return self.base + "/" + "/".join(quote(str(s), safe="") for s in segments)

    def _get(self, url: str) -> str:
        """GET with retries on connection errors, timeouts and 5xx; a 4xx or the last failure raises EnvError."""
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.get(url)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                logger.warning("WebShop request %s failed (attempt %d): %s", url, attempt + 1, last)
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                logger.warning("WebShop request %s failed (attempt %d): %s", url, attempt + 1, last)
                continue
            if response.status_code >= 400:
                raise EnvError(
                    f"WebShop server answered HTTP {response.status_code} for {url}: {response.text[:200]!r}; "
                    "expected a page. Check the session id and that env.options.url / WEBSHOP_URL is a WebShop server"
                )
            return response.text
        raise EnvError(
            f"WebShop server did not answer {url} after {self.max_retries + 1} attempts ({last}). Check that the "
            f"server is running and that env.options.url (WEBSHOP_URL) points at it, e.g. start ours with "
            f"`retroformer webshop-server --port 3000` and set WEBSHOP_URL=http://127.0.0.1:3000"
        )

    def _load(self, *segments: Any) -> str:
        self.page = parse_page(self._get(self._url(*segments)))
        return render(self.page, self.options, show_instruction=self.page_type == "start")

    def _options_literal(self) -> str:
        return repr(dict(self.options))

    def _goto_start(self) -> str:
        self.page_type, self.query, self.page_num, self.asin, self.options = "start", "", 1, "", {}
        return self._load(self.session)

    def _goto_results(self, page_num: int) -> str:
        self.page_type, self.page_num, self.asin, self.options = "results", page_num, "", {}
        return self._load("search_results", self.session, self.query, page_num)

    def _goto_item(self) -> str:
        self.page_type = "item"
        return self._load("item_page", self.session, self.asin, self.query, self.page_num, self._options_literal())

    # -- TextEnv ---------------------------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        self.session = str(task.payload.get("session", task.task_id))
        self._reset_state()
        return self._goto_start()

    def step(self, action: str) -> StepResult:
        if not self.session:
            raise EnvError("WebShopEnv.step() called before reset(); call reset(task) first")
        if self.done:
            return StepResult(INVALID, done=True, info={"invalid": True})
        match = _ACTION_RE.match(action.strip())
        if not match:
            return StepResult(INVALID, info={"invalid": True})
        name, arg = match.group(1).lower(), match.group(2).strip()
        if name == "think":
            return StepResult("OK.")
        if name == "search":
            if not self.page.has_search or not arg:
                return StepResult(INVALID, info={"invalid": True})
            # A slash would split the URL path; the real server lower-cases queries anyway.
            self.query = " ".join(arg.replace("/", " ").split())
            return StepResult(self._goto_results(1))
        if name == "click":
            return self._click(arg)
        return StepResult(INVALID, info={"invalid": True})

    def _click(self, target: str) -> StepResult:
        key = target.lower()
        for item in self.page.items:
            if item.text.lower() != key or item.kind not in ("button", "product", "option"):
                continue
            if item.kind == "product" and self.page_type == "results":
                self.asin, self.options = item.text, {}
                return StepResult(self._goto_item())
            if item.kind == "option" and self.page_type == "item":
                self.options[item.group or item.text] = item.text
                return StepResult(f"You have clicked {item.text}.")
            if item.kind == "button":
                result = self._press(item.text)
                if result is not None:
                    return result
        return StepResult(INVALID, info={"invalid": True})

    def _press(self, button: str) -> StepResult | None:
        """The effect of a button on the current page, or None when it does nothing here."""
        key = button.lower()
        if key == "back to search" and self.page_type != "start":
            return StepResult(self._goto_start())
        if key == "next >" and self.page_type == "results":
            return StepResult(self._goto_results(self.page_num + 1))
        if key == "< prev":
            if self.page_type == "results" and self.page_num > 1:
                return StepResult(self._goto_results(self.page_num - 1))
            if self.page_type == "item":
                return StepResult(self._goto_results(self.page_num))
            if self.page_type == "sub":
                return StepResult(self._goto_item())
        sub = next((s for s in SUB_PAGES if s.lower() == key), None)
        if sub is not None and self.page_type == "item":
            self.page_type = "sub"
            opts = self._options_literal()
            return StepResult(
                self._load("item_sub_page", self.session, self.asin, self.query, self.page_num, sub, opts)
            )
        if key == "buy now" and self.page_type == "item":
            self.page_type = "done"
            observation = self._load("done", self.session, self.asin, self._options_literal())
            score = parse_score(observation)
            if score is None:
                raise EnvError(
                    f"WebShop done page for session {self.session!r} shows no 'Your score (min 0.0, max 1.0)'; "
                    f"got {observation[:300]!r}. Check that env.options.url points at a WebShop server"
                )
            self.score, self.done = score, True
            return StepResult(observation, reward=score, done=True, info={"score": score})
        return None

    def outcome(self) -> Outcome:
        score = self.score if self.score is not None else 0.0
        return Outcome(return_=score, success=score >= 1.0, metrics={"score": score})

    def close(self) -> None:
        self._http.close()


@register_env("webshop")
class WebShopSuite(EnvSuite):
    """Sessions ``fixed_<i>`` of a WebShop server; our own server on 127.0.0.1 when ``url`` is null."""

    version = "1"
    prompts = PROMPTS

    @dataclass
    class Config:
        # --- server ---
        url: str | None = doc(
            "base URL of a WebShop server, e.g. http://127.0.0.1:3000 (the scripts fill it from WEBSHOP_URL); "
            "null starts our small compatible server with an invented catalog on 127.0.0.1 for the run",
            None,
        )
        page_size: int = doc("results per page of our own server (url null only; the real server shows 10)", 3)
        # --- tasks ---
        session_start: int = doc("first goal index: sessions fixed_<start> .. fixed_<start+n-1>", 0)
        num_sessions: int | None = doc(
            "number of sessions; null: every goal of our server (url null) or 100, the paper's protocol", None
        )
        max_steps: int = doc("actor steps per episode (WebShop protocol: 15)", 15)
        # --- HTTP ---
        timeout_s: float = doc("per-request timeout in seconds", 10.0)
        max_retries: int = doc("retries of a request on connection errors, timeouts and 5xx", 3)
        retry_backoff_s: float = doc("wait before the first retry; doubles after each", 0.5)

        def __post_init__(self) -> None:
            if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
                raise ConfigError(
                    f"env.options.url must be an http(s) base URL such as http://127.0.0.1:3000, got {self.url!r}; "
                    "set WEBSHOP_URL or leave url null to use the built-in server"
                )
            for name in ("page_size", "max_steps"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"env.options.{name} must be >= 1, got {getattr(self, name)}")
            if self.num_sessions is not None and self.num_sessions < 1:
                raise ConfigError(f"env.options.num_sessions must be >= 1 or null, got {self.num_sessions}")
            if self.session_start < 0:
                raise ConfigError(f"env.options.session_start must be >= 0, got {self.session_start}")
            if self.timeout_s <= 0:
                raise ConfigError(f"env.options.timeout_s must be > 0, got {self.timeout_s}")
            if self.max_retries < 0 or self.retry_backoff_s < 0:
                raise ConfigError(
                    f"env.options.max_retries and retry_backoff_s must be >= 0, got {self.max_retries} and "
                    f"{self.retry_backoff_s}"
                )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._server: Any = None  # our own server, started on first make() when url is null
        self._lock = threading.Lock()

    def tasks(self) -> list[Task]:
        n = self.config.num_sessions
        if self.config.url is None:
            from retroformer.envs.webshop_server import load_catalog

            goals = len(load_catalog().goals)
            if n is None:
                n = goals - self.config.session_start
            if self.config.session_start + n > goals:
                # The built-in server answers 404 for a session past its goals: fail here, not mid-run.
                raise ConfigError(
                    f"env.options.num_sessions={n} from session_start={self.config.session_start} asks for goals past "
                    f"the built-in catalog's {goals} goals; lower num_sessions (or session_start), or set url to a "
                    "real WebShop server"
                )
        elif n is None:
            n = PAPER_NUM_SESSIONS
        start = self.config.session_start
        return [Task(task_id=f"fixed_{i}", payload={"session": f"fixed_{i}"}) for i in range(start, start + n)]

    @property
    def url(self) -> str:
        """The server's base URL, starting our own server on first use when ``url`` is null."""
        if self.config.url is not None:
            return self.config.url
        with self._lock:
            if self._server is None:
                from retroformer.envs.webshop_server import start_server

                self._server = start_server("127.0.0.1", 0, page_size=self.config.page_size)
                logger.info("started the built-in WebShop-compatible server at %s", self._server.url)
            return self._server.url

    def make(self) -> TextEnv:
        cfg = self.config
        return WebShopEnv(self.url, cfg.timeout_s, cfg.max_retries, cfg.retry_backoff_s)

    def fingerprint(self, tasks: list[Task]) -> str:
        # Runs on different servers share session ids; the server (ours or a URL) keeps them apart.
        where = "builtin-catalog" if self.config.url is None else self.config.url.rstrip("/")
        return text_hash("\n".join([self.name, self.version, where, *[t.task_id for t in tasks]]))

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.stop()
                logger.info("stopped the built-in WebShop-compatible server at %s", self._server.url)
                self._server = None
