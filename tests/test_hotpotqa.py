"""HotPotQA environment: loaders, selection, docstores (context and a local MediaWiki double), actions, scoring."""

from __future__ import annotations

import ast
import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from retroformer.envs import make_suite
from retroformer.envs.base import Task
from retroformer.envs.hotpotqa import (
    FIXTURE_PATH,
    TRUNCATION_MARKER,
    HotpotQASuite,
    WikipediaDocstore,
    corpus,
    exact_match,
    f1_score,
    load_questions,
    normalize_answer,
)
from retroformer.errors import ConfigError, DataError, EnvError

FIXTURE = json.loads(FIXTURE_PATH.read_text())


def suite(**options) -> HotpotQASuite:
    s = make_suite("hotpotqa", options)
    assert isinstance(s, HotpotQASuite)
    return s


def task_by_id(s: HotpotQASuite, task_id: str) -> Task:
    return next(t for t in s.tasks() if t.task_id == task_id)


def drive(s: HotpotQASuite, task: Task, actions: list[str]):
    env = s.make()
    env.reset(task)
    return env, [env.step(a) for a in actions]


# --- fixture and golden path ---------------------------------------------------------------------------------------


def test_fixture_is_official_schema_with_fictional_mix():
    assert len(FIXTURE) >= 6
    assert {r["type"] for r in FIXTURE} == {"bridge", "comparison"}
    assert {"yes", "no"} <= {r["answer"] for r in FIXTURE}
    for r in FIXTURE:
        assert set(r) == {"_id", "question", "answer", "type", "level", "supporting_facts", "context"}
        gold = {t for t, _ in r["supporting_facts"]}
        titles = [t for t, _ in r["context"]]
        assert len(gold) == 2 and gold <= set(titles)
        assert len(titles) - len(gold) >= 3, f"{r['_id']} needs several distractor paragraphs"


@pytest.mark.parametrize("record", FIXTURE, ids=[r["_id"] for r in FIXTURE])
def test_searching_both_gold_titles_and_answering_reaches_em_1(record):
    s = suite()
    gold_titles = list(dict.fromkeys(t for t, _ in record["supporting_facts"]))
    env, results = drive(
        s, task_by_id(s, record["_id"]), [*(f"Search[{t}]" for t in gold_titles), f"Finish[{record['answer']}]"]
    )
    for (title, idx), result in zip(record["supporting_facts"], results, strict=False):
        sentence = dict((t, ss) for t, ss in record["context"])[title][idx]
        assert sentence in result.observation  # the supporting sentence is visible after the search
    assert not any(r.done for r in results[:-1])
    assert results[-1].done and "CORRECT" in results[-1].observation and "INCORRECT" not in results[-1].observation
    outcome = env.outcome()
    assert outcome.return_ == 1.0 and outcome.success
    assert outcome.metrics["em"] == 1.0 and outcome.metrics["f1"] == 1.0


def test_wrong_answer_scores_zero_with_partial_f1_recorded():
    s = suite()
    task = task_by_id(s, "fx-comparison-velder-carrow")  # gold: "Velder River"
    env, results = drive(s, task, ["Finish[the Velder]"])
    assert results[-1].done and "INCORRECT" in results[-1].observation
    outcome = env.outcome()
    assert outcome.return_ == 0.0 and not outcome.success
    assert outcome.metrics["em"] == 0.0
    assert outcome.metrics["f1"] == pytest.approx(2 / 3)  # precision 1, recall 1/2

    s_f1 = suite(reward="f1")
    env, _ = drive(s_f1, task_by_id(s_f1, task.task_id), ["Finish[the Velder]"])
    assert env.outcome().return_ == pytest.approx(2 / 3) and not env.outcome().success


def test_answer_normalisation_and_label_answers():
    assert normalize_answer("  The Hurdy-Gurdy!  ") == "hurdygurdy"
    assert normalize_answer("An  Apple, a Pear") == "apple pear"
    assert exact_match("the velder river.", "Velder River") == 1.0
    assert exact_match("Velder", "Velder River") == 0.0
    # yes/no/noanswer are labels: overlapping tokens do not earn partial credit.
    assert f1_score("no it was not", "no") == 0.0
    assert f1_score("yes", "no") == 0.0
    assert f1_score("Yes.", "yes") == 1.0
    assert f1_score("Teodor", "Teodor Quist") == pytest.approx(2 / 3)
    assert f1_score("", "Quillhaven") == 0.0


# --- actions --------------------------------------------------------------------------------------------------------


def test_invalid_actions_are_reported_and_flagged():
    s = suite()
    env, results = drive(s, s.tasks()[0], ["Jump[high]", "search Salt Ledger", "Search[]", "sEaRcH[Salt Ledger]"])
    for r in results[:3]:
        assert r.info.get("invalid") is True and not r.done
        assert "Search[entity], Lookup[keyword], Finish[answer]" in r.observation
    assert results[3].info.get("invalid") is None  # action names are case-insensitive
    assert results[3].observation.startswith("Salt Ledger is a 1987 memoir")


def test_lookup_before_search_says_there_is_no_page():
    s = suite()
    _, results = drive(s, s.tasks()[0], ["Lookup[lighthouse]"])
    assert "No page" in results[0].observation and "Search[entity]" in results[0].observation
    assert not results[0].done


def test_lookup_pages_through_matches_then_says_no_more():
    s = suite(search_sentences=2, max_steps=20)
    task = task_by_id(s, "fx-bridge-salt-ledger")
    pages = dict((t, ss) for t, ss in task.payload["context"])
    page = pages["Odile Varnhem"]
    matching = [x for x in page if "lighthouse" in x.lower()]
    assert len(matching) >= 3
    actions = ["Search[odile varnhem]", *["Lookup[Lighthouse]"] * (len(matching) + 1)]
    env = s.make()
    env.reset(task)
    first, *lookups = [env.step(a) for a in actions]
    assert first.observation == " ".join(page[:2])  # search_sentences caps the summary
    n = len(matching)
    for i, (r, sentence) in enumerate(zip(lookups, matching, strict=False), 1):
        assert r.observation == f"(Result {i} / {n}) {sentence}"
    assert "No more results for [Lighthouse]" in lookups[-1].observation
    # A new search resets the paging to the new page.
    r = env.step("Search[Salt Ledger]")
    assert not r.done
    assert env.step("Lookup[lighthouse]").observation == "(Result 1 / 1) " + pages["Salt Ledger"][0]


def test_near_miss_title_lists_similar_titles_and_keeps_last_page():
    s = suite()
    task = task_by_id(s, "fx-comparison-velder-carrow")
    env, results = drive(s, task, ["Search[Carrow Water]", "Search[Velder]", "Lookup[kilometres]"])
    miss = results[1].observation
    assert miss.startswith("Could not find [Velder]. Similar: [")
    for title in ("Velder River", "Velder River Bridge", "Velder (surname)"):
        assert repr(title) in miss
    listed = ast.literal_eval(miss.split("Similar: ", 1)[1])
    assert len(listed) == 5 and all("Velder" in t for t in listed[:3])  # closest titles first, num_similar of them
    assert results[2].observation == "(Result 1 / 1) It is 268 kilometres long and drains into Lake Ombry."


def test_step_limit_ends_episode_when_driving_the_env():
    s = suite(max_steps=3)
    env, results = drive(s, s.tasks()[0], ["Search[Salt Ledger]", "Search[Salt Ledger]", "Search[Salt Ledger]"])
    assert [r.done for r in results] == [False, False, True]
    assert "Step limit reached: 3 actions" in results[-1].observation
    assert results[-1].info["end_reason"] == "step_limit"
    after = env.step("Finish[Quillhaven]")
    assert after.info.get("invalid") and after.done
    outcome = env.outcome()
    assert outcome.return_ == 0.0 and outcome.metrics["answered"] == 0.0 and outcome.metrics["f1"] == 0.0


def test_long_observations_are_truncated_with_a_marker():
    s = suite(max_observation_chars=60)
    _, results = drive(s, s.tasks()[0], ["Search[Odile Varnhem]"])
    obs = results[0].observation
    assert obs.endswith(TRUNCATION_MARKER) and len(obs) <= 60
    assert obs.startswith("Odile Varnhem (1931-2009)")


# --- the trial loop's episode runner ---------------------------------------------------------------------------------


def _react_actor(s: HotpotQASuite, replies: list[str]):
    from retroformer.agents.actor import ReActActor
    from retroformer.llm import SamplingParams, ScriptedLLM

    llm = ScriptedLLM(replies, cycle=True)
    return ReActActor(llm, s.prompts, SamplingParams(max_tokens=64)), llm


def test_episode_runner_hits_the_step_limit_and_counts_invalid_actions():
    from retroformer.rollout import run_episode

    s = suite()
    actor, llm = _react_actor(s, ["I look again.\nAction: Search[Salt Ledger]", "Hmm.\nAction: Fly[away]"])
    result = asyncio.run(run_episode(s, s.make(), actor, s.tasks()[0], memory=[]))
    assert result.end_reason == "step_limit"
    assert len(result.steps) == s.max_steps == 6
    assert result.num_invalid_actions == 3
    assert "Step limit reached" in result.steps[-1].observation
    assert result.outcome.metrics["em"] == 0.0
    # The actor's prompt holds our instructions, the few-shot examples and the question.
    assert "Here are examples:\nTask: In what year was the architect" in llm.prompts[0]
    assert llm.prompts[0].rstrip().endswith("Task: " + s.tasks()[0].payload["question"] + "\nThought:")


def test_episode_runner_success_with_scripted_actor():
    from retroformer.rollout import run_episode

    s = suite()
    task = task_by_id(s, "fx-yesno-ferrant-lowmere")
    actor, _ = _react_actor(
        s,
        [
            "Find the first year of each.\nAction: Search[Ferrant Cup]",
            "1911. Now the shield.\nAction: Search[lowmere shield]",
            "1923 differs from 1911.\nAction: Finish[No]",
        ],
    )
    result = asyncio.run(run_episode(s, s.make(), actor, task, memory=[]))
    assert result.end_reason == "success" and result.outcome.return_ == 1.0
    assert [st.action for st in result.steps] == ["Search[Ferrant Cup]", "Search[lowmere shield]", "Finish[No]"]


# --- loaders and selection --------------------------------------------------------------------------------------------


def _hf_rows() -> list[dict]:
    """The fixture in the Hugging Face layout (dicts of lists)."""
    return [
        {
            "id": r["_id"],
            "question": r["question"],
            "answer": r["answer"],
            "type": r["type"],
            "level": r["level"],
            "supporting_facts": {
                "title": [t for t, _ in r["supporting_facts"]],
                "sent_id": [i for _, i in r["supporting_facts"]],
            },
            "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]},
        }
        for r in FIXTURE
    ]


def test_official_and_hugging_face_layouts_load_to_the_same_questions(tmp_path):
    official = load_questions(FIXTURE_PATH)
    rows = _hf_rows()
    (tmp_path / "hf.json").write_text(json.dumps(rows))
    (tmp_path / "hf.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "columns.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf.parquet")
    for name in ("hf.json", "hf.jsonl", "columns.json", "hf.parquet"):
        assert load_questions(tmp_path / name) == official, name
    # And through the suite: the same task ids, so the same fingerprint.
    s_file = suite(data_path=str(tmp_path / "hf.parquet"))
    assert s_file.fingerprint(s_file.tasks()) == suite().fingerprint(suite().tasks())


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_questions(tmp_path / "nope.json")
    unlabelled = dict(FIXTURE[0])
    del unlabelled["answer"]
    (tmp_path / "test.json").write_text(json.dumps([unlabelled]))
    with pytest.raises(DataError, match="test split is unlabelled"):
        load_questions(tmp_path / "test.json")
    bad = dict(FIXTURE[0], context="not a list")
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(DataError, match="context is str"):
        load_questions(tmp_path / "bad.json")


def test_selection_by_level_ids_slice_and_seeded_sample():
    all_ids = [r["_id"] for r in FIXTURE]
    hard = [r["_id"] for r in FIXTURE if r["level"] == "hard"]
    assert [t.task_id for t in suite(level="hard").tasks()] == hard
    picked = [all_ids[3], all_ids[0]]
    assert [t.task_id for t in suite(task_ids=picked).tasks()] == picked
    assert [t.task_id for t in suite(start=2, stop=5).tasks()] == all_ids[2:5]
    a = [t.task_id for t in suite(level="hard", sample=3, sample_seed=7).tasks()]
    assert a == [t.task_id for t in suite(level="hard", sample=3, sample_seed=7).tasks()]
    assert len(a) == 3 and set(a) <= set(hard) and a == [i for i in hard if i in a]  # data order kept
    draws = {tuple(t.task_id for t in suite(level="hard", sample=3, sample_seed=seed).tasks()) for seed in range(8)}
    assert len(draws) > 1
    s1, s2 = suite(task_ids=picked), suite(task_ids=picked[::-1])
    assert s1.fingerprint(s1.tasks()) != s2.fingerprint(s2.tasks())
    s3 = suite(task_ids=picked, docstore="wikipedia")
    assert s3.fingerprint(s3.tasks()) != s1.fingerprint(s1.tasks())


def test_selection_and_config_errors():
    with pytest.raises(DataError, match="not in the data"):
        suite(task_ids=["fx-missing"]).tasks()
    with pytest.raises(DataError, match="sample=50"):
        suite(sample=50).tasks()
    with pytest.raises(ConfigError, match="level"):
        suite(level="brutal")
    with pytest.raises(ConfigError, match="set only one"):
        suite(data_path="x.json", hub_dataset="hotpotqa/hotpot_qa")
    with pytest.raises(ConfigError, match="task_ids cannot be combined"):
        suite(task_ids=["a"], sample=1)
    with pytest.raises(ConfigError, match="max_steps"):
        suite(max_steps=0)
    with pytest.raises(ConfigError, match="unknown config key"):
        suite(max_step=3)


def test_hub_loader_parses_rows_and_wraps_offline_errors(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return _hf_rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    s = suite(hub_dataset="hotpotqa/hotpot_qa", level="hard")
    assert [t.task_id for t in s.tasks()] == [r["_id"] for r in FIXTURE if r["level"] == "hard"]
    assert calls == [("hotpotqa/hotpot_qa", "distractor", "validation")]

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="data_path"):
        suite(hub_dataset="hotpotqa/hotpot_qa").tasks()


def test_corpus_holds_prompts_and_fixture_text():
    texts = corpus()
    joined = "\n".join(texts)
    assert "Lookup[keyword]" in joined and "Quillhaven" in joined and "Reflection:" in joined
    assert all(isinstance(t, str) and t for t in texts)


# --- Wikipedia docstore against a local MediaWiki double --------------------------------------------------------------

WIKI_PAGES = {
    "Odile Varnhem": (
        "Odile Varnhem (1931-2009) was a lighthouse keeper and writer. She was born in Quillhaven. "
        "She kept the Brannock Rock light.\n\n== Later life ==\n"
        "In 1975 she moved to Corrick. Her lighthouse diaries are in a museum."
    ),
    "Brannock Rock": "Brannock Rock may refer to:\nBrannock Rock (islet), a rock.\nBrannock Rock Light, a lighthouse.",
    "Brannock Rock Light": "Brannock Rock Light is a lighthouse on Brannock Rock. It was first lit in 1870.",
}
REDIRECTS = {"Varnhem": "Odile Varnhem"}


@dataclass
class WikiDouble:
    url: str
    requests: list[dict] = field(default_factory=list)
    user_agents: list[str] = field(default_factory=list)
    fail_next: int = 0


@pytest.fixture
def wiki() -> Iterator[WikiDouble]:
    state = WikiDouble(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
            state.requests.append(q)
            state.user_agents.append(self.headers.get("User-Agent", ""))
            if state.fail_next > 0:
                state.fail_next -= 1
                self._send(503, {"error": "busy"})
                return
            if q.get("format") != "json" or q.get("formatversion") != "2" or q.get("action") != "query":
                self._send(200, {"error": {"code": "badparams", "info": f"unexpected {q}"}})
                return
            if q.get("list") == "search":
                words = q["srsearch"].lower().split()
                hits = [t for t in WIKI_PAGES if any(w in t.lower() for w in words)]
                hits = hits[: int(q.get("srlimit", 10))]
                body = {
                    "query": {"searchinfo": {"totalhits": len(hits)}, "search": [{"ns": 0, "title": t} for t in hits]}
                }
                self._send(200, {"batchcomplete": True, **body})
                return
            if q.get("prop") == "extracts":
                title = q["titles"]
                title = title[:1].upper() + title[1:]  # MediaWiki capitalises only the first letter
                query: dict = {}
                if q.get("redirects") and title in REDIRECTS:
                    query["redirects"] = [{"from": title, "to": REDIRECTS[title]}]
                    title = REDIRECTS[title]
                if title in WIKI_PAGES:
                    query["pages"] = [{"pageid": 1, "ns": 0, "title": title, "extract": WIKI_PAGES[title]}]
                else:
                    query["pages"] = [{"ns": 0, "title": title, "missing": True}]
                self._send(200, {"batchcomplete": True, "query": query})
                return
            self._send(200, {"error": {"code": "unknown", "info": "unsupported query"}})

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/w/api.php"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def wiki_suite(wiki: WikiDouble, **options) -> HotpotQASuite:
    return suite(
        docstore="wikipedia",
        wikipedia_api_url=wiki.url,
        wikipedia_timeout_s=2.0,
        wikipedia_backoff_s=0.0,
        wikipedia_user_agent="retroformer-tests/1",
        **options,
    )


def test_wikipedia_docstore_search_similar_redirect_and_lookup(wiki):
    s = wiki_suite(wiki, search_sentences=2)
    env = s.make()
    env.reset(s.tasks()[0])
    found = env.step("Search[odile Varnhem]").observation
    assert found == "Odile Varnhem (1931-2009) was a lighthouse keeper and writer. She was born in Quillhaven."
    lookups = [env.step("Lookup[lighthouse]").observation for _ in range(3)]
    assert lookups[0] == "(Result 1 / 2) Odile Varnhem (1931-2009) was a lighthouse keeper and writer."
    assert lookups[1] == "(Result 2 / 2) Her lighthouse diaries are in a museum."  # second paragraph, no heading
    assert "No more results" in lookups[2]
    # A miss lists the search hits as similar titles.
    miss = env.step("Search[Varnhem Brannock]").observation
    assert miss.startswith("Could not find [Varnhem Brannock]. Similar: [")
    assert "'Odile Varnhem'" in miss and "'Brannock Rock Light'" in miss
    s.close()
    # Case-insensitive exact match through the search hits, a redirect, and a disambiguation page.
    store = WikipediaDocstore(
        wiki.url, timeout_s=2.0, retries=0, backoff_s=0.0, user_agent="retroformer-tests/1", num_similar=5
    )
    try:
        assert store.search("odile varnhem").page.title == "Odile Varnhem"
        assert store.search("Varnhem").page.title == "Odile Varnhem"
        disamb = store.search("Brannock Rock")
        assert disamb.page is None and "Brannock Rock Light" in disamb.similar
        n = len(wiki.requests)
        store.search("ODILE VARNHEM")  # cached under the same normalised key
        assert len(wiki.requests) == n
    finally:
        store.close()
    assert set(wiki.user_agents) == {"retroformer-tests/1"}


def test_wikipedia_docstore_retries_then_fails_clearly(wiki):
    s = wiki_suite(wiki, wikipedia_retries=2)
    env = s.make()
    env.reset(s.tasks()[0])
    wiki.fail_next = 2  # two 503s, then an answer: within the retries
    assert env.step("Search[Brannock Rock Light]").observation.startswith("Brannock Rock Light is a lighthouse")
    assert len(wiki.requests) == 3
    wiki.fail_next = 3  # one more failure than attempts allowed
    with pytest.raises(EnvError, match="failed 3 times .*HTTP 503"):
        env.step("Search[Odile Varnhem]")
    s.close()


# --- recipes and the trial loop ----------------------------------------------------------------------------------------

RECIPES = Path(__file__).resolve().parents[1] / "experiments" / "hotpotqa"
TRIAL_RECIPES = ["react", "reflexion", "retroformer", "collect", "toy_scripted", "toy_tiny"]


@pytest.mark.parametrize("name", TRIAL_RECIPES)
def test_trial_recipes_parse_and_validate_env_options(name):
    from retroformer.config import from_dict, read_yaml
    from retroformer.trials import TrialsConfig

    cfg = from_dict(TrialsConfig, read_yaml(RECIPES / f"{name}.yaml"))
    assert cfg.env.name == "hotpotqa"
    s = make_suite(cfg.env.name, cfg.env.options)
    if name in ("react", "reflexion", "retroformer"):
        # The paper's protocol, identical across the three evaluation runs so their fingerprints match.
        assert (s.config.level, s.config.sample, s.config.max_steps, cfg.trials) == ("hard", 100, 6, 5)
        assert (cfg.reflector.kind == "none") == (name == "react")


def test_stage_recipes_parse():
    from retroformer.config import from_dict, read_yaml
    from retroformer.training.ppo import PPORunConfig
    from retroformer.training.sft import SFTStageConfig

    sft = from_dict(SFTStageConfig, read_yaml(RECIPES / "sft.yaml"))
    ppo = from_dict(PPORunConfig, read_yaml(RECIPES / "ppo.yaml"))
    assert ppo.sft_adapter == sft.output_dir and 1 <= sft.lora.r <= 4


def test_toy_recipe_runs_through_the_trial_loop(tmp_path):
    from retroformer.config import from_dict, read_yaml
    from retroformer.trials import TrialsConfig, run_trials

    data = read_yaml(RECIPES / "toy_scripted.yaml")
    data["runs_dir"] = str(tmp_path)
    cfg = from_dict(TrialsConfig, data)
    result = run_trials(cfg)
    first = [r for r in result.records if r.trial == 0]
    assert sorted(r.task_id for r in first) == sorted(r["_id"] for r in FIXTURE)
    assert all({"em", "f1"} <= set(r.metrics) for r in result.records)
    assert sum(r.num_invalid_actions for r in result.records) > 0
    failed = [r for r in result.records if not r.success and r.trial + 1 < cfg.trials]
    assert failed and all(r.reflection is not None for r in failed)
    later = [r for r in result.records if r.trial > 0]
    assert later and all(r.memory for r in later)  # reflections reach the next attempt's prompt
    assert all(r.success == (r.metrics["em"] == 1.0) for r in result.records)
    assert result.dataset_path is not None and result.dataset_path.exists()


def test_html_escaped_titles_are_unescaped_and_stray_whitespace_is_stripped(tmp_path):
    # the real data has titles such as "Tom &amp; Jerry" (also gold ones) and questions with stray spaces
    record = json.loads(json.dumps(FIXTURE[0]))
    old_title = record["supporting_facts"][0][0]
    escaped = "Salt &amp; Pepper Works"
    record["context"] = [[escaped if t == old_title else t, [f" {s} " for s in ss]] for t, ss in record["context"]]
    record["supporting_facts"] = [[escaped if t == old_title else t, i] for t, i in record["supporting_facts"]]
    record["question"] = f"  {record['question']}\n"
    (tmp_path / "q.json").write_text(json.dumps([record]))
    (q,) = load_questions(tmp_path / "q.json")
    assert (
        "Salt & Pepper Works" in dict(q.context)
        and ("Salt & Pepper Works", record["supporting_facts"][0][1]) in q.supporting_facts
    )
    assert q.question == FIXTURE[0]["question"].strip()
    assert all(s == s.strip() for _, ss in q.context for s in ss)
    s = suite(data_path=str(tmp_path / "q.json"))
    _, (result,) = drive(s, s.tasks()[0], ["Search[Salt & Pepper Works]"])
    assert (
        "Could not find" not in result.observation and dict(q.context)["Salt & Pepper Works"][0] in result.observation
    )
