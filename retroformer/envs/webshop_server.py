"""A small WebShop-compatible server: the same routes and page structure, an invented catalog, the same reward.

    retroformer webshop-server --host 127.0.0.1 --port 3000

It exists so that the WebShop client (:mod:`retroformer.envs.webshop`) runs offline in tests and demos. It is **not**
a replacement of the real WebShop server (Yao et al., 2022), which serves 1,000 or 1.18 M scraped products and needs
data and spaCy models that users set up themselves.

Routes (``options`` is a dict literal of selected option values, e.g. ``{'size': '16 oz'}``, URL-quoted)::

    /<session>                                                      start page: instruction + search box
    /search_results/<session>/<query>/<page>                        BM25 results, ``page_size`` per page
    /item_page/<session>/<asin>/<query>/<page>/<options>            product page with its option groups
    /item_sub_page/<session>/<asin>/<query>/<page>/<sub>/<options>  Description | Features | Reviews | Attributes
    /done/<session>/<asin>/<options>                                purchase; shows the score

Session ``fixed_<i>`` selects goal ``i``; any other session id selects a goal by a stable hash of the id. The server
keeps no per-session state (everything it needs is in the URL), so it is safe under a threaded WSGI server.

Reward, as in WebShop: ``(matched goal attributes + matched goal options + [price <= limit]) / (number of goal
attributes + number of goal options + 1)``, times a product-type factor. Where the real server uses a language model
or fuzzy-string library, we use documented deterministic approximations:

- *fuzzy match* of two strings (attributes, options): equal after normalisation, or the same numbers and a
  ``difflib`` similarity >= 0.85 (so ``3 ounce (pack of 1)`` never matches ``3 ounce (pack of 6)``);
- *attribute match*: a goal attribute fuzzily matches one of the product's attributes, or occurs as a phrase in the
  product's title, description or features;
- *product type factor* (the real one compares spaCy noun chunks): ``title_score`` is the share of the goal
  product's title words that occur in the purchased title; the factor is 1.0 when the products came from the same
  search query or share their top two category levels with ``title_score >= 0.5``; 0.5 when they share the
  categories or ``title_score >= 0.5``; 0.1 when any title word is shared; 0.0 otherwise.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import html
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from retroformer.config import doc
from retroformer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_CATALOG = Path(__file__).parent / "webshop_data" / "catalog.json"
SUB_PAGES = ("Description", "Features", "Reviews", "Attributes")
#: Shown on the done page; clients parse the score that follows it.
SCORE_LABEL = "Your score (min 0.0, max 1.0)"
FUZZY_THRESHOLD = 0.85
_STOPWORDS = frozenset("a an and the for with of in on to by or from at is it its this that".split())


# ---------------------------------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    category: list[str]
    query: str
    price: float
    rating: float
    attributes: list[str]
    options: dict[str, list[str]]
    description: str
    features: list[str]
    reviews: list[dict[str, Any]]


@dataclass(frozen=True)
class Goal:
    asin: str
    instruction_text: str
    attributes: list[str]
    goal_options: dict[str, str]
    price_upper: float


@dataclass
class Catalog:
    """Products and goal instructions; ``goals[i]`` is the goal of session ``fixed_<i>``."""

    products: list[Product]
    goals: list[Goal]
    by_asin: dict[str, Product] = field(init=False)

    def __post_init__(self) -> None:
        self.by_asin = {p.asin: p for p in self.products}
        for i, goal in enumerate(self.goals):
            if goal.asin not in self.by_asin:
                raise DataError(f"WebShop goal {i} names product {goal.asin!r}, which is not in the catalog")

    def goal_for(self, session_id: str) -> Goal | None:
        """``fixed_<i>`` -> goal i (None when out of range); any other id -> a goal chosen by a stable hash."""
        match = re.fullmatch(r"fixed_(\d+)", session_id)
        if match:
            i = int(match.group(1))
            return self.goals[i] if i < len(self.goals) else None
        digest = int(hashlib.sha256(session_id.encode("utf-8")).hexdigest(), 16)
        return self.goals[digest % len(self.goals)]


def catalog_from_dict(data: dict[str, Any], where: str = "catalog") -> Catalog:
    """A catalog from plain data: ``{'products': [...], 'goals': [...]}`` with the fields of :class:`Product`/:class:`Goal`."""
    try:
        products = [Product(**item) for item in data["products"]]
        goals = [Goal(**item) for item in data["goals"]]
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"WebShop {where} is malformed ({type(exc).__name__}: {exc}); expected {{'products': [...], "
            f"'goals': [...]}} with the fields of {DEFAULT_CATALOG.name}"
        ) from None
    if not products or not goals:
        raise DataError(
            f"WebShop {where} has {len(products)} products and {len(goals)} goals; it needs at least 1 of each"
        )
    return Catalog(products, goals)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read a catalog JSON; the default is our invented one (``webshop_data/catalog.json``)."""
    p = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"WebShop catalog {str(p)!r} does not exist; pass an existing catalog JSON") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"WebShop catalog {str(p)!r} is not valid JSON: {exc}") from None
    return catalog_from_dict(data, where=f"catalog {str(p)!r}")


# ---------------------------------------------------------------------------------------------------- matching


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace squashed."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def fuzzy_match(a: str, b: str) -> bool:
    """Deterministic stand-in for WebShop's fuzzy matching: same numbers and a close spelling (see module doc)."""
    na, nb = normalize(a), normalize(b)
    if na == nb:
        return True
    if re.findall(r"\d+", na) != re.findall(r"\d+", nb):
        return False
    return difflib.SequenceMatcher(None, na, nb).ratio() >= FUZZY_THRESHOLD


def _content_words(text: str) -> set[str]:
    return {t for t in tokens(text) if t not in _STOPWORDS}


def type_factor(purchased: Product, target: Product) -> float:
    """Product-type factor (1, 0.5, 0.1 or 0): query, category and title overlap (see module doc)."""
    target_words = _content_words(target.title)
    title_score = len(target_words & _content_words(purchased.title)) / max(len(target_words), 1)
    query_match = normalize(purchased.query) == normalize(target.query)
    category_match = [c.lower() for c in purchased.category[:2]] == [c.lower() for c in target.category[:2]]
    if query_match or (category_match and title_score >= 0.5):
        return 1.0
    if category_match or title_score >= 0.5:
        return 0.5
    if title_score > 0:
        return 0.1
    return 0.0


def reward(catalog: Catalog, goal: Goal, purchased: Product, options: dict[str, str]) -> dict[str, float]:
    """The WebShop reward of buying ``purchased`` with ``options`` for ``goal``, with its parts."""
    # Padded with spaces so that a phrase only matches whole words.
    product_text = f" {normalize(' '.join([purchased.title, purchased.description, *purchased.features]))} "
    attr_matches = 0
    for attribute in goal.attributes:
        if any(fuzzy_match(attribute, a) for a in purchased.attributes) or f" {normalize(attribute)} " in product_text:
            attr_matches += 1
    selected = [str(v) for v in options.values()]
    option_matches = sum(1 for want in goal.goal_options.values() if any(fuzzy_match(want, s) for s in selected))
    price_ok = purchased.price <= goal.price_upper
    r_type = type_factor(purchased, catalog.by_asin[goal.asin])
    total = (attr_matches + option_matches + int(price_ok)) / (len(goal.attributes) + len(goal.goal_options) + 1)
    return {
        "reward": total * r_type,
        "r_type": r_type,
        "r_att": attr_matches / max(len(goal.attributes), 1),
        "r_option": option_matches / max(len(goal.goal_options), 1),
        "r_price": float(price_ok),
    }


class SearchEngine:
    """BM25 (``rank_bm25.BM25Okapi``) over each product's title, category, query and attributes."""

    def __init__(self, products: list[Product]) -> None:
        from rank_bm25 import BM25Okapi

        self.products = products
        docs = [tokens(" ".join([p.title, *p.category, p.query, *p.attributes])) for p in products]
        self.bm25 = BM25Okapi(docs)

    def search(self, query: str) -> list[Product]:
        """Products whose score is positive, best first (ties keep catalog order); all products if none is."""
        scores = self.bm25.get_scores(tokens(query))
        ranked = sorted(range(len(self.products)), key=lambda i: (-scores[i], i))
        hits = [self.products[i] for i in ranked if scores[i] > 0]
        return hits or [self.products[i] for i in ranked]


# ---------------------------------------------------------------------------------------------------- pages


def parse_keywords(raw: str) -> str:
    """The query of a URL: a plain string, or a list literal of words as the real server's own links carry."""
    if raw.startswith("["):
        try:
            words = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            words = [raw]
        return " ".join(str(w) for w in words) if isinstance(words, (list, tuple)) else raw
    return raw


def parse_options(raw: str) -> dict[str, str] | None:
    """A dict literal of selected options, or None when ``raw`` is not one."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, dict):
        return None
    return {str(k): str(v) for k, v in value.items()}


def _q(value: Any) -> str:
    return quote(str(value), safe="")


def _page(title: str, goal: Goal, body: str, top: str = "") -> str:
    esc = html.escape
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title></head><body>\n{top}"
        f"<div id='instruction-text'><h4>Instruction:</h4><p>{esc(goal.instruction_text)}</p></div>\n"
        f"{body}\n</body></html>\n"
    )


def _button(label: str, href: str) -> str:
    # A form per button, so the page also works in a browser; agents only read the button text.
    return f"<form method='get' action='{html.escape(href)}'><button type='submit'>{html.escape(label)}</button></form>"


def render_start(session_id: str, goal: Goal) -> str:
    body = (
        f"<form method='post' action='/{_q(session_id)}'>"
        "<input type='text' name='search_query' placeholder='Search...'>"
        "<button type='submit'>Search</button></form>"
    )
    return _page("WebShop", goal, body, top="<h1>WebShop</h1>\n")


def render_results(session_id: str, goal: Goal, query: str, page: int, hits: list[Product], page_size: int) -> str:
    esc = html.escape
    start = (page - 1) * page_size
    shown = hits[start : start + page_size]
    parts = [_button("Back to Search", f"/{_q(session_id)}")]
    parts.append(f"<div class='page-info'>Page {page} (Total results: {len(hits)})</div>")
    if page > 1:
        parts.append(_button("< Prev", f"/search_results/{_q(session_id)}/{_q(query)}/{page - 1}"))
    # The real server shows [Next >] on every results page, also when no further page exists.
    parts.append(_button("Next >", f"/search_results/{_q(session_id)}/{_q(query)}/{page + 1}"))
    for p in shown:
        href = f"/item_page/{_q(session_id)}/{_q(p.asin)}/{_q(query)}/{page}/{_q('{}')}"
        parts.append(
            "<div class='result'>"
            f"<a class='product-link' href='{esc(href)}'>{esc(p.asin)}</a>"
            f"<h4 class='product-title'>{esc(p.title)}</h4><h5 class='product-price'>${p.price:.2f}</h5></div>"
        )
    return _page("Results", goal, "\n".join(parts))


def render_item(session_id: str, goal: Goal, product: Product, query: str, page: int, options: dict[str, str]) -> str:
    esc = html.escape
    opts = _q(repr(options))
    parts = [
        _button("Back to Search", f"/{_q(session_id)}"),
        _button("< Prev", f"/search_results/{_q(session_id)}/{_q(query)}/{page}"),
    ]
    for group, values in product.options.items():
        parts.append(f"<div class='option-group'><h4>{esc(group)}</h4>")
        for i, value in enumerate(values):
            checked = " checked" if options.get(group) == value else ""
            rid = f"radio_{esc(group)}_{i}"
            parts.append(
                f"<input type='radio' id='{rid}' name='{esc(group)}' value='{esc(value)}'{checked}>"
                f"<label for='{rid}'>{esc(value)}</label>"
            )
        parts.append("</div>")
    parts.append(f"<h2 class='product-title'>{esc(product.title)}</h2>")
    parts.append(f"<h4 class='product-price'>Price: ${product.price:.2f}</h4>")
    parts.append(f"<h4 class='product-rating'>Rating: {product.rating}</h4>")
    base = f"/item_sub_page/{_q(session_id)}/{_q(product.asin)}/{_q(query)}/{page}"
    for sub in SUB_PAGES:
        parts.append(_button(sub, f"{base}/{sub}/{opts}"))
    parts.append(_button("Buy Now", f"/done/{_q(session_id)}/{_q(product.asin)}/{opts}"))
    return _page(product.title, goal, "\n".join(parts))


def render_sub_page(
    session_id: str, goal: Goal, product: Product, query: str, page: int, sub: str, options: dict[str, str]
) -> str:
    esc = html.escape
    opts = _q(repr(options))
    parts = [
        _button("Back to Search", f"/{_q(session_id)}"),
        _button("< Prev", f"/item_page/{_q(session_id)}/{_q(product.asin)}/{_q(query)}/{page}/{opts}"),
        f"<h3>{esc(sub)}</h3>",
    ]
    if sub == "Description":
        parts.append(f"<p>{esc(product.description)}</p>")
    elif sub == "Features":
        parts.extend(f"<li>{esc(f)}</li>" for f in product.features)
    elif sub == "Reviews":
        for r in product.reviews:
            parts.append(f"<div class='review'><h4>{esc(str(r['title']))}</h4><p>Rating: {r['score']} / 5</p>")
            parts.append(f"<p>{esc(str(r['body']))}</p></div>")
    else:
        parts.extend(f"<li>{esc(a)}</li>" for a in product.attributes)
    return _page(f"{product.title} - {sub}", goal, "\n".join(parts))


def render_done(session_id: str, goal: Goal, product: Product, options: dict[str, str], score: float) -> str:
    esc = html.escape
    chosen = ", ".join(f"{k}: {v}" for k, v in options.items()) or "none"
    body = (
        "<h1>Thank you for shopping with us!</h1>\n"
        f"<p>Purchased: {esc(product.asin)}</p>\n<p>Options: {esc(chosen)}</p>\n"
        # As the real server renders it: the label, then the number in an element of its own.
        f"<h3 id='reward'>{SCORE_LABEL}<pre>{score:.4g}</pre></h3>"
    )
    return _page("Done", goal, body)


# ---------------------------------------------------------------------------------------------------- app


def create_app(catalog: Catalog | None = None, page_size: int = 3):
    """The Flask app. ``page_size`` results per page (the real server shows 10; our catalog is small)."""
    from flask import Flask, abort, redirect, request

    if page_size < 1:
        raise ConfigError(f"webshop server page_size must be >= 1, got {page_size}")
    catalog = catalog if catalog is not None else load_catalog()
    engine = SearchEngine(catalog.products)
    app = Flask(__name__)

    def goal_or_404(session_id: str) -> Goal:
        goal = catalog.goal_for(session_id)
        if goal is None:
            abort(404, description=f"session {session_id!r}: there are only {len(catalog.goals)} fixed goals")
        return goal

    def product_or_404(asin: str) -> Product:
        if asin not in catalog.by_asin:
            abort(404, description=f"no product with asin {asin!r}")
        return catalog.by_asin[asin]

    def page_or_400(raw: str) -> int:
        if not raw.isdigit() or int(raw) < 1:
            abort(400, description=f"page must be a positive integer, got {raw!r}")
        return int(raw)

    def options_or_400(raw: str) -> dict[str, str]:
        options = parse_options(raw)
        if options is None:
            abort(400, description=f"options must be a dict literal such as {{'size': 'large'}}, got {raw!r}")
        return options

    @app.route("/<session_id>", methods=["GET", "POST"])
    def index(session_id: str):
        goal = goal_or_404(session_id)
        if request.method == "POST" and request.form.get("search_query", "").strip():
            query = request.form["search_query"].strip().lower().replace("/", " ")
            return redirect(f"/search_results/{_q(session_id)}/{_q(query)}/1")
        return render_start(session_id, goal)

    @app.get("/search_results/<session_id>/<keywords>/<page>")
    def search_results(session_id: str, keywords: str, page: str):
        goal = goal_or_404(session_id)
        query = parse_keywords(keywords)
        return render_results(session_id, goal, query, page_or_400(page), engine.search(query), page_size)

    @app.get("/item_page/<session_id>/<asin>/<keywords>/<page>/<path:options>")
    def item_page(session_id: str, asin: str, keywords: str, page: str, options: str):
        goal = goal_or_404(session_id)
        return render_item(
            session_id, goal, product_or_404(asin), parse_keywords(keywords), page_or_400(page), options_or_400(options)
        )

    @app.get("/item_sub_page/<session_id>/<asin>/<keywords>/<page>/<sub_page>/<path:options>")
    def item_sub_page(session_id: str, asin: str, keywords: str, page: str, sub_page: str, options: str):
        goal = goal_or_404(session_id)
        if sub_page not in SUB_PAGES:
            abort(404, description=f"sub page must be one of {', '.join(SUB_PAGES)}, got {sub_page!r}")
        product = product_or_404(asin)
        return render_sub_page(
            session_id, goal, product, parse_keywords(keywords), page_or_400(page), sub_page, options_or_400(options)
        )

    @app.get("/done/<session_id>/<asin>/<path:options>")
    def done(session_id: str, asin: str, options: str):
        goal = goal_or_404(session_id)
        product = product_or_404(asin)
        chosen = options_or_400(options)
        parts = reward(catalog, goal, product, chosen)
        logger.debug("session %s bought %s with %s: reward %.4g", session_id, asin, chosen, parts["reward"])
        return render_done(session_id, goal, product, chosen, parts["reward"])

    return app


class RunningServer:
    """A server running in a background thread; :meth:`stop` shuts it down and joins the thread."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = server.host
        self.port = int(server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=timeout_s)

    def wait(self) -> None:
        """Block until the server stops."""
        self._thread.join()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    host: str = "127.0.0.1", port: int = 0, catalog: Catalog | None = None, page_size: int = 3
) -> RunningServer:
    """Start the server in a daemon thread (``port=0``: a free port) and return once it accepts connections."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class _Handler(WSGIRequestHandler):
        # Request lines go to our logger at DEBUG instead of werkzeug's stderr handler, so runs stay quiet.
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            logger.debug("%s %s %s", self.command, self.path, code)

    server = make_server(host, port, create_app(catalog, page_size), threaded=True, request_handler=_Handler)
    thread = threading.Thread(target=server.serve_forever, name=f"webshop-server-{server.server_port}", daemon=True)
    thread.start()
    running = RunningServer(server, thread)
    logger.debug("WebShop-compatible server listening on %s", running.url)
    return running


@dataclass
class WebShopServerConfig:
    """Serve the invented WebShop catalog (for tests and offline demos; not the real WebShop server)."""

    host: str = doc("interface to bind; keep 127.0.0.1 unless others must reach it", "127.0.0.1")
    port: int = doc("port to listen on; 0 picks a free one (printed at start)", 3000)
    page_size: int = doc("search results per page (the real server shows 10; our catalog has 11 products)", 3)
    catalog: str | None = doc("catalog JSON with 'products' and 'goals'; null: the built-in invented catalog", None)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}; use 0 for a free port")
        if self.page_size < 1:
            raise ConfigError(f"page_size must be >= 1, got {self.page_size}")


def main(argv: list[str] | None = None) -> None:
    """Console entry: ``retroformer webshop-server --port 3000`` (Ctrl-C stops it)."""
    from retroformer.config import load_config

    cfg = load_config(WebShopServerConfig, argv, prog="retroformer webshop-server")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    catalog = load_catalog(cfg.catalog)
    running = start_server(cfg.host, cfg.port, catalog, cfg.page_size)
    print(
        f"WebShop-compatible server on {running.url} (sessions fixed_0 .. fixed_{len(catalog.goals) - 1}); "
        f"point clients at it with WEBSHOP_URL={running.url}",
        flush=True,
    )
    try:
        running.wait()
    except KeyboardInterrupt:
        print("stopping", flush=True)  # Ctrl-C is the documented way to stop the server
    finally:
        running.stop()


if __name__ == "__main__":
    main()
