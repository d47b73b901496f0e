"""One reflector across environments: the online reward routed to the run each row came from, the mixture of the
training data per environment, and metrics per environment."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import torch
from helpers_training import load_script, tiny_models  # noqa: F401

from retroformer.config import from_dict
from retroformer.errors import ConfigError, DataError
from retroformer.training.mixing import EnvRewardRecorder, env_counts, mix_indices
from retroformer.training.ppo import PPORunConfig
from retroformer.training.rewards import EnvRewardSource, RunRouter
from retroformer.trials import TrialsConfig, dataset_path, run_trials

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def vault_run(runs: Path, name: str = "vault") -> Path:
    cfg = from_dict(TrialsConfig, {
        "run_name": name, "runs_dir": str(runs), "trials": 2,
        "env": {"name": "synthetic", "options": {"num_tasks": 4, "num_doors": 3}}, "actor": {"kind": "plan"},
        "reflector": {"llm": {"backend": "scripted", "scripted_policy": "synthetic-clue",
                              "scripted_options": {"carry_prob": 0.0}}},
    })  # fmt: skip
    return Path(run_trials(cfg, progress=False).run_dir)


def hotpotqa_run(runs: Path, name: str = "hotpot") -> Path:
    import yaml

    data = yaml.safe_load((REPO / "experiments" / "hotpotqa" / "toy_scripted.yaml").read_text())
    data.update(run_name=name, runs_dir=str(runs), trials=2)
    return Path(run_trials(from_dict(TrialsConfig, data), progress=False).run_dir)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    return {"synthetic": vault_run(runs), "hotpotqa": hotpotqa_run(runs)}


def dataset_rows(run_dir: Path) -> list[dict]:
    from datasets import load_from_disk

    return list(load_from_disk(str(dataset_path(run_dir))))


class Recording:
    """A scorer double: records the rows it was given and scores each by its position in ``value``."""

    def __init__(self, value: float) -> None:
        self.value, self.seen = value, []

    async def score(self, rows, reflections):
        self.seen += [r["task_id"] for r in rows]
        return [self.value] * len(rows)


def test_multi_env_each_row_reaches_its_own_runs_scorer_and_no_other():
    scorers = {"run-a": Recording(1.0), "run-b": Recording(-1.0)}
    router = RunRouter(scorers)
    rows = [{"run_name": r, "task_id": f"{r}-{k}"} for k, r in enumerate(["run-a", "run-b", "run-b", "run-a", "run-b"])]
    scores = asyncio.run(router.score(rows, ["y"] * len(rows)))
    assert scores == [1.0, -1.0, -1.0, 1.0, -1.0]  # back in the rows' order
    assert scorers["run-a"].seen == ["run-a-0", "run-a-3"]
    assert scorers["run-b"].seen == ["run-b-1", "run-b-2", "run-b-4"]
    with pytest.raises(DataError, match=r"comes from run 'run-c', which is not in env_run_dirs"):
        asyncio.run(router.score([{"run_name": "run-c", "task_id": "t"}], ["y"]))


def test_multi_env_routed_reward_with_real_trials_runs(two_runs):
    router = RunRouter.from_run_dirs([str(two_runs["synthetic"]), str(two_runs["hotpotqa"])])
    assert sorted(router.scorers) == ["hotpot", "vault"]
    seen: dict[str, list[str]] = {}
    for name, scorer in router.scorers.items():  # record what reaches each run's scorer, then score for real
        real = scorer.score

        async def score(rows, reflections, real=real, name=name):
            seen.setdefault(name, []).extend(r["task_id"] for r in rows)
            return await real(rows, reflections)

        scorer.score = score
    vault, hotpot = dataset_rows(two_runs["synthetic"]), dataset_rows(two_runs["hotpotqa"])
    n = min(len(vault), len(hotpot))
    assert n >= 2
    rows = [r for pair in zip(vault[:n], hotpot[:n], strict=True) for r in pair]
    doors = [re.findall(r"the way out is the (\w+) door", r["prompt"]) for r in rows]
    reflections = [f"Next time open[{d[-1]}]." if d else "Search each entity first." for d in doors]
    source = EnvRewardSource(router)
    try:
        scores = source.score([r["prompt"] for r in rows], reflections, rows)
    finally:
        source.close()
    assert seen["vault"] == [r["task_id"] for r in rows if r["env_name"] == "synthetic"]
    assert seen["hotpot"] == [r["task_id"] for r in rows if r["env_name"] == "hotpotqa"]
    # the vault's plan-following actor opens the door the reflection names: its next attempt succeeds
    assert [s for s, r in zip(scores, rows, strict=True) if r["env_name"] == "synthetic"] == [1.0] * n


def ppo_argv(tiny_models, tmp_path, **over) -> list[str]:  # noqa: F811
    values = {"model": tiny_models["lm"], "output_dir": str(tmp_path / "ppo"), "num_iterations": 2, "batch_size": 2,
              "num_samples_per_prompt": 2, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4,
              "max_prompt_length": 48, "lora.target_modules": "q_proj,v_proj", "reward_source": "env"}  # fmt: skip
    values.update(over)
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def yaml_list(paths) -> str:
    return "[" + ", ".join(str(p) for p in paths) + "]"


def test_multi_env_unlisted_run_is_an_error_before_training(two_runs, tiny_models, tmp_path, monkeypatch):  # noqa: F811
    import retroformer.training.ppo_stage as stage

    monkeypatch.setattr(stage, "build_policy", lambda cfg: pytest.fail("a model was loaded"))
    data = yaml_list(dataset_path(d) for d in two_runs.values())
    argv = ppo_argv(tiny_models, tmp_path, dataset=data, env_run_dirs=yaml_list([two_runs["synthetic"]]))
    with pytest.raises(DataError, match=r"prompts of runs \{'hotpot': \d+\} .* come from no run in env_run_dirs "
                       r"\(runs \['vault'\]\); add those runs' directories"):  # fmt: skip
        load_script("ppo_run").main(argv)
    assert not (tmp_path / "ppo").exists()
    argv = ppo_argv(tiny_models, tmp_path, dataset=data, env_run_dirs=yaml_list([two_runs["synthetic"]] * 2))
    with pytest.raises(ConfigError, match="are both run 'vault'; list each run once"):
        load_script("ppo_run").main(argv)
    with pytest.raises(ConfigError, match="set env_run_dir .* or env_run_dirs .*, not both"):
        PPORunConfig(model="m", dataset=["d"], reward_source="env", env_run_dir="a", env_run_dirs=["b"])


def test_multi_env_ppo_with_the_routed_reward_logs_metrics_per_environment(two_runs, tiny_models, tmp_path):  # noqa: F811
    from test_tracking import scalars

    data = yaml_list(dataset_path(d) for d in two_runs.values())
    argv = ppo_argv(tiny_models, tmp_path, dataset=data, env_run_dirs=yaml_list(two_runs.values()), eval_dataset=data,
                    eval_steps=2, balance_envs="true", report_to="tensorboard")  # fmt: skip
    metrics = load_script("ppo_run").main(argv)
    saved = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    for key in ("eval/synthetic/success", "eval/hotpotqa/success", "eval/synthetic/reward_mean", "eval/success"):
        assert key in metrics and key in saved, key
    assert any(k in saved for k in ("ppo/synthetic/reward_mean", "ppo/hotpotqa/reward_mean"))
    tags = scalars(tmp_path / "ppo" / "tensorboard")
    assert tags["eval/synthetic/success"] == [2] and tags["eval/hotpotqa/success"] == [2]
    per_env = [t for t in tags if re.fullmatch(r"ppo/(synthetic|hotpotqa)/reward_mean", t)]
    assert per_env and all(tags[t] for t in per_env)
    history = json.loads((tmp_path / "ppo" / "history.json").read_text())
    assert all(any(k.endswith("/reward_mean") and k.count("/") == 2 for k in h) for h in history)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_multi_env_trl_algorithms_take_the_routed_reward(two_runs, tiny_models, tmp_path, algorithm):  # noqa: F811
    data = yaml_list(dataset_path(d) for d in two_runs.values())
    argv = ppo_argv(tiny_models, tmp_path, dataset=data, env_run_dirs=yaml_list(two_runs.values()),
                    algorithm=algorithm, num_iterations=1)  # fmt: skip
    metrics = load_script("ppo_run").main(argv)
    assert metrics["ppo/algorithm_steps"] == 1
    assert any(re.fullmatch(r"ppo/(synthetic|hotpotqa)/reward_mean", k) for k in metrics)


def test_multi_env_weights_hold():
    envs = ["a"] * 30 + ["b"] * 10
    assert mix_indices(envs, {}, False, 0) == list(range(40))  # no mixing asked for: the rows as they come
    counts = env_counts([envs[i] for i in mix_indices(envs, {"a": 1, "b": 3}, False, 0)])
    assert counts == {"a": 10, "b": 30}
    balanced = mix_indices(envs, {}, True, 0)
    assert env_counts([envs[i] for i in balanced]) == {"a": 20, "b": 20}
    assert sorted(set(i for i in balanced if envs[i] == "b")) == list(range(30, 40))  # every b row, twice
    assert env_counts([envs[i] for i in mix_indices(envs, {"a": 0}, False, 0)]) == {"b": 40}
    with pytest.raises(ConfigError, match=r"env_weights names \['c'\], which no row has"):
        mix_indices(envs, {"c": 1}, False, 0)
    for bad, match in (({"a": -1}, "must be a number >= 0"), ({"a": 0}, "leaves every environment out")):
        with pytest.raises(ConfigError, match=match):
            PPORunConfig(model="m", dataset=["d"], reward_model="r", env_weights=bad)
    with pytest.raises(ConfigError, match="set one of them"):
        PPORunConfig(model="m", dataset=["d"], reward_model="r", env_weights={"a": 1}, balance_envs=True)


def test_multi_env_weights_reach_sft_the_reward_model_and_ppo_prompts(two_runs, tiny_models, tmp_path):  # noqa: F811
    from retroformer.training.ppo_stage import load_prompts
    from retroformer.training.reward import RewardStageConfig, prepare_reward_data
    from retroformer.training.sft import SFTStageConfig, check_inputs

    data = [str(dataset_path(d)) for d in two_runs.values()]
    envs = lambda rows: env_counts([r["env_name"] for r in rows])  # noqa: E731
    cfg = PPORunConfig(model="m", dataset=data, reward_model="r", env_weights={"synthetic": 1, "hotpotqa": 3})
    natural = envs(load_prompts(cfg)[1])
    mixed = envs(load_prompts(cfg, mix=True)[1])
    assert sum(mixed.values()) == sum(natural.values()) and mixed["hotpotqa"] == pytest.approx(
        3 * mixed["synthetic"], abs=1
    )

    sft = SFTStageConfig(model=tiny_models["lm"], dataset=data, output_dir="x", min_rating=-1.0, balance_envs=True)
    _, _, info = check_inputs(sft)
    assert info["sft/synthetic/num_examples"] == info["sft/hotpotqa/num_examples"]
    assert info["sft/synthetic/num_selected"] != info["sft/hotpotqa/num_selected"]

    rm = RewardStageConfig(model=tiny_models["rm"], dataset=data, output_dir="x", mode="regression", eval_fraction=0.0,
                           env_weights={"synthetic": 3, "hotpotqa": 1})  # fmt: skip
    counts = prepare_reward_data(rm).env_info
    assert counts["reward/synthetic/num_train_rows"] == pytest.approx(
        3 * counts["reward/hotpotqa/num_train_rows"], abs=1
    )


def test_multi_env_recorder_reports_rewards_per_environment():
    recorder = EnvRewardRecorder(lambda prompts, reflections, rows: [1.0, 0.0, 0.5])
    rows = [{"env_name": "a"}, {"env_name": "b"}, {"env_name": "a"}]
    assert recorder.score(["p"] * 3, ["y"] * 3, rows) == [1.0, 0.0, 0.5]
    assert recorder.drain() == {"ppo/a/reward_mean": 0.75, "ppo/b/reward_mean": 0.0}
    assert recorder.drain() == {}
    assert recorder.totals() == {"ppo/a/reward_mean": 0.75, "ppo/b/reward_mean": 0.0}


@pytest.mark.parametrize(
    ("recipe", "cls"),
    [
        ("sft.yaml", "sft"), ("reward.yaml", "reward"), ("ppo.yaml", "ppo"), ("toy/sft.yaml", "sft"),
        ("toy/reward.yaml", "reward"), ("toy/ppo.yaml", "ppo"), ("collect_alfworld.yaml", "trials"),
        ("collect_webshop.yaml", "trials"), ("toy/collect_vault.yaml", "trials"), ("toy/eval_vault.yaml", "trials"),
        ("toy/hotpotqa.yaml", "trials"), ("toy/alfworld.yaml", "trials"), ("toy/webshop.yaml", "trials"),
    ],
)  # fmt: skip
def test_multi_env_recipes_load(recipe, cls):
    from retroformer.config import load_config
    from retroformer.training.reward import RewardStageConfig
    from retroformer.training.sft import SFTStageConfig

    classes = {"sft": SFTStageConfig, "reward": RewardStageConfig, "ppo": PPORunConfig, "trials": TrialsConfig}
    cfg = load_config(classes[cls], ["--config", str(REPO / "experiments" / "multi" / recipe)])
    if cls in ("sft", "reward", "ppo"):
        assert len(cfg.dataset) == (4 if recipe.startswith("toy/") else 3)
        assert cfg.balance_envs
    if recipe == "toy/ppo.yaml":
        assert cfg.reward_source == "env" and len(cfg.env_run_dirs) == 4


def test_multi_env_toy_driver_runs_every_stage_for_every_environment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_toy", REPO / "experiments" / "multi" / "run_toy.py")
    run_toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_toy)
    titles = [title for title, _ in run_toy.pipeline("runs/x", 0)]
    assert titles[1:5] == ["collect: vault", "collect: hotpotqa", "collect: alfworld", "collect: webshop"]
    assert sum(t.startswith("evaluate: ") for t in titles) == 4 * 4  # every environment, every condition
    ppo = dict(run_toy.pipeline("runs/x", 0))["PPO, online reward routed per run"]
    runs = ppo[ppo.index("--env_run_dirs") + 1]
    assert runs == "[runs/x/vault-collect, runs/x/hotpotqa-collect, runs/x/alfworld-collect, runs/x/webshop-collect]"
