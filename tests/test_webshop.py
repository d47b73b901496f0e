"""WebShop client against our WebShop-compatible server on 127.0.0.1 (port 0, started and stopped here)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retroformer.envs import make_suite
from retroformer.envs.base import Task
from retroformer.envs.webshop import (
    EXAMPLE_CATALOG,
    EXAMPLE_STEPS,
    INVALID,
    PROMPTS,
    WebShopEnv,
    WebShopSuite,
    corpus,
    parse_page,
    parse_score,
    render,
)
from retroformer.envs.webshop_server import (
    RunningServer,
    WebShopServerConfig,
    catalog_from_dict,
    fuzzy_match,
    load_catalog,
    reward,
    start_server,
    type_factor,
)
from retroformer.errors import ConfigError, EnvError


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server("127.0.0.1", 0, page_size=2)
    yield running
    running.stop()


@pytest.fixture()
def env(server: RunningServer) -> Iterator[WebShopEnv]:
    e = WebShopEnv(server.url, timeout_s=5.0, max_retries=0, retry_backoff_s=0.0)
    yield e
    e.close()


def task(i: int) -> Task:
    return Task(task_id=f"fixed_{i}", payload={"session": f"fixed_{i}"})


def run(env: WebShopEnv, actions: list[str]):
    return [env.step(a) for a in actions]


def test_right_product_with_right_options_scores_one(env: WebShopEnv) -> None:
    first = env.reset(task(0))
    assert first.splitlines()[:2] == ["WebShop", "Instruction:"] and first.endswith("[Search]")
    assert "slate blue" in first
    results = run(env, ["search[ceramic coffee mug microwave safe]", "click[B0WS100001]", "click[Slate Blue]"])
    assert "[B0WS100001]" in results[0].observation
    assert "[16 oz]" in results[1].observation and "[Buy Now]" in results[1].observation
    assert results[2].observation == "You have clicked slate blue."
    assert env.step("click[16 oz]").observation == "You have clicked 16 oz."
    done = env.step("click[Buy Now]")
    assert done.done and done.reward == 1.0
    assert "Your score (min 0.0, max 1.0)\n1" in done.observation
    outcome = env.outcome()
    assert outcome.return_ == 1.0 and outcome.success and outcome.metrics == {"score": 1.0}
    assert env.step("click[Buy Now]").info == {"invalid": True}  # nothing to do after the purchase


def test_missing_option_scores_partially(env: WebShopEnv) -> None:
    env.reset(task(1))
    run(env, ["search[organic lavender hand soap]", "click[B0WS100004]", "click[lavender]"])
    done = env.step("click[Buy Now]")  # size never chosen: 2/2 attributes, 1/2 options, price within limit
    expected = (2 + 1 + 1) / (2 + 2 + 1)
    assert done.done and done.reward == pytest.approx(expected, abs=1e-4)
    outcome = env.outcome()
    assert not outcome.success and outcome.return_ == pytest.approx(expected, abs=1e-4)


def test_wrong_product_type_is_discounted(env: WebShopEnv) -> None:
    env.reset(task(2))  # women's trail shoes; buy the men's road shoes in a size the goal names
    run(env, ["search[running shoes]", "click[< Prev]"])
    obs = env.step("click[Back to Search]").observation
    assert obs.endswith("[Search]")
    run(env, ["search[men running shoes]"])
    item = env.step("click[B0WS100007]")
    assert "[Buy Now]" in item.observation, item.observation
    done = env.step("click[Buy Now]")
    assert 0.0 < done.reward < 0.5 and not env.outcome().success


def test_invalid_actions_are_marked(env: WebShopEnv) -> None:
    env.reset(task(0))
    for action in ["click[Buy Now]", "click[B0WS100001]", "jump[high]", "search[]", "click[Search]", "buy it"]:
        result = env.step(action)
        assert result.observation == INVALID and result.info == {"invalid": True} and not result.done, action
    assert env.step("think[I should search first]").observation == "OK."
    env.step("search[coffee mug]")
    assert env.step("search[hand soap]").info == {"invalid": True}  # no search box on the results page
    assert env.step("click[< Prev]").info == {"invalid": True}  # page 1 has no previous page
    assert env.step("click[B0WS999999]").info == {"invalid": True}  # not on this page
    assert env.step("click[lavender]").info == {"invalid": True}  # an option of no product shown


def test_pagination_sub_pages_and_back_navigation(env: WebShopEnv) -> None:
    env.reset(task(0))
    page1 = env.step("search[mug]").observation
    assert "Page 1 (Total results:" in page1 and "[Next >]" in page1 and "[< Prev]" not in page1
    page2 = env.step("click[Next >]").observation
    assert "Page 2 (Total results:" in page2 and "[< Prev]" in page2
    back = env.step("click[< Prev]").observation
    assert back == page1
    env.step("click[B0WS100001]")
    env.step("click[charcoal]")
    desc = env.step("click[Description]").observation
    assert "hand on the Tidewater coast" in desc and desc.startswith("[Back to Search]\n[< Prev]")
    assert env.step("click[Buy Now]").info == {"invalid": True}  # only on the product page
    item = env.step("click[< Prev]").observation
    assert "[[charcoal]]" in item and "[sand]" in item  # the selection survives the sub-page
    assert env.step("click[< Prev]").observation == page1  # item page -> its results page
    start = env.step("click[Back to Search]").observation
    assert start.endswith("[Search]") and "[[charcoal]]" not in start
    assert not env.step("search[travel mug]").info  # searching works again from the start page


def test_step_limit_ends_without_purchase() -> None:
    suite = make_suite("webshop", {"max_steps": 4})
    try:
        assert suite.max_steps == 4 and make_suite("webshop", {}).max_steps == 15
        env = suite.make()
        env.reset(suite.tasks()[0])
        # Drive it like the trial loop does: at most max_steps actions, stop early only on done.
        steps = 0
        for action in ["search[mug]", "click[B0WS100001]", "click[16 oz]", "think[maybe]", "click[Buy Now]"]:
            if steps == suite.max_steps:
                break
            steps += 1
            if env.step(action).done:
                break
        assert steps == 4
        assert env.outcome().return_ == 0.0 and not env.outcome().success
        env.close()
    finally:
        suite.close()


def test_suite_starts_its_own_server_and_stops_it() -> None:
    suite = make_suite("webshop", {"max_retries": 0, "timeout_s": 2.0})
    tasks = suite.tasks()
    assert [t.task_id for t in tasks] == ["fixed_0", "fixed_1", "fixed_2", "fixed_3"]
    env = suite.make()
    url = suite.url
    assert url.startswith("http://127.0.0.1:")
    assert "roasted almonds" in env.reset(tasks[3])
    suite.close()
    with pytest.raises(EnvError, match="did not answer"):
        env.reset(tasks[0])
    env.close()


def test_server_down_gives_clear_error_after_retries() -> None:
    with socket.socket() as s:  # a port that nothing listens on once the socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = WebShopEnv(f"http://127.0.0.1:{port}", timeout_s=1.0, max_retries=2, retry_backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(EnvError, match=r"after 3 attempts.*server is running.*WEBSHOP_URL") as err:
        env.reset(task(0))
    assert f"127.0.0.1:{port}/fixed_0" in str(err.value)
    assert time.monotonic() - t0 < 10
    env.close()


def test_unknown_session_is_a_clear_error(env: WebShopEnv) -> None:
    with pytest.raises(EnvError, match="HTTP 404"):
        env.reset(task(99))


def test_few_shot_example_matches_what_the_client_shows() -> None:
    with start_server("127.0.0.1", 0, catalog=catalog_from_dict(EXAMPLE_CATALOG), page_size=3) as srv:
        env = WebShopEnv(srv.url, timeout_s=5.0, max_retries=0, retry_backoff_s=0.0)
        first = env.reset(task(0))
        assert PROMPTS.examples.startswith(f"Task: {first}\n")
        for thought, action, expected in EXAMPLE_STEPS:
            observation = env.step(action).observation
            assert f"Thought: {thought}\nAction: {action}\nObservation: {observation}\n" in PROMPTS.examples
            if expected != "__DONE__":
                assert observation == expected
        assert env.outcome().success
        env.close()


def test_reward_matching_rules() -> None:
    catalog = load_catalog()
    assert fuzzy_match("Slate-Blue", "slate blue") and fuzzy_match("dishwasher-safe", "dishwasher safe")
    assert not fuzzy_match("3 ounce (pack of 1)", "3 ounce (pack of 6)")  # numbers must agree
    assert not fuzzy_match("lavender", "lemongrass")
    goal = catalog.goals[0]
    mug, set_of_4, lamp = (catalog.by_asin[a] for a in ("B0WS100001", "B0WS100003", "B0WS100011"))
    assert type_factor(mug, mug) == 1.0 and type_factor(set_of_4, mug) == 1.0  # same search query
    assert type_factor(lamp, mug) == 0.0
    parts = reward(catalog, goal, set_of_4, {"color": "speckled white"})
    # set of 4: dishwasher safe only (1/2 attributes), no option matches, over the price limit.
    assert parts["reward"] == pytest.approx((1 + 0 + 0) / (2 + 2 + 1))


def test_html_rendering_of_a_real_style_page() -> None:
    html = (
        "<html><head><title>x</title><style>p{}</style></head><body><div id='instruction-text'><h4>Instruction:<br>"
        "buy a lamp</h4></div><button class='btn'>Back to <b>Search</b></button>"
        "<input type='radio' name='color' value='white' checked><label>white</label>"
        "<input type='radio' name='color' value='black'><label>black</label>"
        "<a class='product-link' href='/x'>B0XY</a><h3>Your score (min 0.0, max 1.0)</h3><h3>0.25</h3></body></html>"
    )
    page = parse_page(html)
    assert render(page, {}, show_instruction=False).splitlines() == [
        "[Back to Search]",
        "[[white]]",
        "[black]",
        "[B0XY]",
        "Your score (min 0.0, max 1.0)",
        "0.25",
    ]
    assert render(page, {"color": "black"}, show_instruction=True).splitlines()[:5] == [
        "Instruction:",
        "buy a lamp",
        "[Back to Search]",
        "[white]",
        "[[black]]",
    ]
    assert parse_score(render(page, {}, show_instruction=False)) == 0.25


def test_server_accepts_list_keywords_and_the_search_form(server: RunningServer) -> None:
    import httpx

    with httpx.Client(base_url=server.url, follow_redirects=True, timeout=5.0) as client:
        listed = client.get("/search_results/fixed_0/%5B%27travel%27%2C%20%27mug%27%5D/1")
        assert listed.status_code == 200 and "B0WS100002" in listed.text
        posted = client.post("/fixed_0", data={"search_query": "Travel Mug"})
        assert posted.status_code == 200 and "/search_results/fixed_0/travel%20mug/1" in str(posted.url)
        assert client.get("/done/fixed_0/B0WS100001/not-a-dict").status_code == 400
        assert client.get("/item_sub_page/fixed_0/B0WS100001/mug/1/Secrets/%7B%7D").status_code == 404


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="env.options.url"):
        make_suite("webshop", {"url": "localhost:3000"})
    with pytest.raises(ConfigError, match="unknown config key"):
        make_suite("webshop", {"max_step": 3})
    with pytest.raises(ConfigError, match="max_steps"):
        WebShopSuite.Config(max_steps=0)
    with pytest.raises(ConfigError, match="port"):
        WebShopServerConfig(port=70000)
    real = make_suite("webshop", {"url": "http://127.0.0.1:3000", "session_start": 10})
    ids = [t.task_id for t in real.tasks()]
    assert len(ids) == 100 and ids[0] == "fixed_10" and ids[-1] == "fixed_109"


def test_corpus_is_offline_text() -> None:
    texts = corpus()
    assert PROMPTS.instructions in texts and any("B0WS100009" in t for t in texts)
    assert all(isinstance(t, str) and t for t in texts)


def test_toy_recipe_through_the_trial_loop(tmp_path) -> None:
    from retroformer.config import load_config
    from retroformer.trials import TrialsConfig, run_trials

    recipe = str(Path(__file__).resolve().parents[1] / "experiments" / "webshop" / "toy_scripted.yaml")
    cfg = load_config(TrialsConfig, ["--config", recipe, "--runs_dir", str(tmp_path), "--export_dataset", "false"])
    result = run_trials(cfg)
    first, second = sorted(result.records, key=lambda r: r.trial)
    assert first.return_ == pytest.approx(0.8, abs=1e-4) and first.end_reason == "done" and not first.success
    assert first.reflection is not None and "slate blue" in first.reflection.text
    assert "slate blue" in " ".join(second.memory)
    assert second.success and second.return_ == 1.0 and second.metrics == {"score": 1.0}
    # The same recipe with too few steps: the loop's step budget ends the episode before the purchase.
    short = load_config(
        TrialsConfig,
        ["--config", recipe, "--runs_dir", str(tmp_path), "--run_name", "short", "--trials", "1",
         "--export_dataset", "false", "--env.options", "{num_sessions: 1, max_steps: 3}"],
    )  # fmt: skip
    (record,) = run_trials(short).records
    assert record.end_reason == "step_limit" and len(record.steps) == 3 and record.return_ == 0.0


def test_done_page_puts_the_score_in_its_own_element_as_the_real_server_does(env: WebShopEnv) -> None:
    from retroformer.envs.webshop_server import load_catalog, render_done

    catalog = load_catalog()
    goal = catalog.goals[0]
    product = catalog.products[0]
    page = render_done("fixed_0", goal, product, {}, 0.75)
    # a scraping client reads the text node after the label: it must be the number
    assert re.search(r"<h3 id=.reward.>Your score \(min 0\.0, max 1\.0\)<pre>0\.75</pre></h3>", page)
    # and our client reads both forms: the real one (label, then the number in its own element) and ours of old
    real = '<h3 id="reward">Your score (min 0.0, max 1.0)<pre>0.75</pre></h3>'
    assert parse_score(render(parse_page(f"<html><body>{real}</body></html>"), {}, False)) == 0.75
    assert parse_score("Your score (min 0.0, max 1.0): 1") == 1.0


def test_results_page_one_always_shows_next_as_the_real_server_does(env: WebShopEnv) -> None:
    env.reset(task(0))
    few = env.step("search[bamboo cutting board juice groove hand soap zzz]").observation
    assert "Page 1 (Total results:" in few and "[Next >]" in few
