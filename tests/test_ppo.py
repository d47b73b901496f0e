"""The PPO module: its pieces one by one, a bandit it must learn, and resume from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from retroformer.errors import ConfigError
from retroformer.tiny import TinyModelConfig, build_tiny_models
from retroformer.training import ppo
from retroformer.training.common import LoraSettings

torch.set_num_threads(1)

ARMS = (" amber", " jade", " pearl", " ochre")  # the bandit's four arms; " pearl" is rewarded
TARGET = " pearl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # the usual small init (0.02): the bandit's arms then start near-uniform, so every arm gets sampled
    return build_tiny_models(TinyModelConfig(out=str(tmp_path_factory.mktemp("tiny")), initializer_range=0.02))


def make_cfg(tiny, tmp_path, **overrides) -> ppo.PPORunConfig:
    values = dict(
        model=str(tiny["lm"]),
        dataset=["(in memory)"],
        reward_model="(stub)",
        output_dir=str(tmp_path / "out"),
        num_iterations=2,
        batch_size=2,
        num_samples_per_prompt=4,
        minibatch_size=4,
        ppo_epochs=1,
        max_new_tokens=4,
        learning_rate=1e-3,
        save_steps=100,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
    )
    values.update(overrides)
    return ppo.PPORunConfig(**values)


# ----------------------------------------------------------------------------------------------------------------- math


def test_clipped_loss_has_no_gradient_beyond_the_clip_range():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    eps = 0.2
    for advantage, logratio, clipped in [
        (1.0, 0.5, True),  # A > 0 and ratio > 1 + eps: already improved enough, no push further
        (-1.0, -0.5, True),  # A < 0 and ratio < 1 - eps: already lowered enough
        (1.0, -0.5, False),  # A > 0 and ratio < 1 - eps: the unclipped term still pulls it up
        (1.0, 0.1, False),  # inside the range
    ]:
        new = torch.full((1, 2), logratio, requires_grad=True)
        loss, clipfrac, _ = ppo.clipped_surrogate_loss(new, old, torch.tensor([advantage]), mask, eps)
        loss.backward()
        if clipped:
            assert torch.all(new.grad == 0), (advantage, logratio)
            assert clipfrac.item() == 1.0
        else:
            # d/dlogp of -A * exp(logp - old), token mean over 2 tokens
            expected = -advantage * torch.exp(torch.tensor(logratio)) / 2
            assert torch.allclose(new.grad, expected.expand(1, 2)), (advantage, logratio)
            assert clipfrac.item() == 0.0


def test_clipped_loss_ignores_masked_tokens():
    new = torch.tensor([[0.1, 5.0]], requires_grad=True)
    loss, _, _ = ppo.clipped_surrogate_loss(new, torch.zeros(1, 2), torch.tensor([2.0]), torch.tensor([[1, 0]]), 0.2)
    loss.backward()
    assert new.grad[0, 1] == 0
    assert loss.item() == pytest.approx(-2.0 * torch.exp(torch.tensor(0.1)).item())


def test_group_mean_baseline_and_batch_normalisation():
    returns = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = ppo.group_advantages(returns, group_size=4, normalize=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    normed = ppo.group_advantages(returns, group_size=4, normalize=True)
    assert torch.allclose(normed, adv / adv.std(), atol=1e-6)
    # a group whose samples all get the same reward carries no signal, with or without normalisation
    assert torch.all(normed[4:] == 0)
    assert torch.all(ppo.group_advantages(torch.ones(8), 4, normalize=True) == 0)


def test_sequence_kl_and_response_mask():
    responses = torch.tensor([[5, 6, 2, 0], [5, 0, 0, 0], [7, 8, 9, 10]])  # eos = 2, pad = 0
    mask = ppo.response_mask(responses, eos_token_id=2, pad_token_id=0)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    logp = torch.tensor([[-1.0, -1.0, -1.0, -9.0]] * 3)
    ref = torch.tensor([[-1.5, -1.0, -2.0, 0.0]] * 3)
    assert ppo.sequence_kl(logp, ref, mask).tolist() == [1.5, 0.5, -7.5]


def test_response_mask_when_pad_is_eos_ends_at_the_stop_string():
    # pad == eos == 2: generation stopped by a stop string pads with 2, which must not count as a sampled eos
    responses = torch.tensor([[5, 6, 2, 2], [5, 9, 2, 2], [7, 8, 9, 10]])
    assert ppo.response_mask(responses, 2, 2).tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    ends = [3, 2, 4]  # row 1 was stopped by its stop string at token 9: the 2 after it is padding
    assert ppo.response_mask(responses, 2, 2, ends).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_stop_string_ends(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["lm"])
    text_ids = tok("I will open it.", add_special_tokens=False)["input_ids"]
    stop_ids = tok("\n\n", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    row_stopped = text_ids + stop_ids + [pad, pad]
    row_open = text_ids + [pad] * (len(stop_ids) + 2)
    ends = ppo.stop_string_ends(tok, torch.tensor([row_stopped, row_open]), "\n\n")
    assert ends == [len(text_ids) + len(stop_ids), len(row_open)]


def test_logprobs_are_those_generate_sampled_from_even_with_lora_dropout(tiny, tmp_path):
    # token_logprobs in train mode (as in the update) must equal the log-probabilities of the tokens under the
    # distribution generate() sampled them from; LoRA dropout would break that unless it is disabled
    from transformers import AutoTokenizer

    cfg = make_cfg(tiny, tmp_path, temperature=0.7, lora=LoraSettings(r=4, alpha=8, dropout=0.5))
    torch.manual_seed(0)
    model, _ = ppo.build_policy(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny["lm"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with torch.no_grad():  # a LoRA update so that the adapter is not the identity
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    enc = tokenizer(["Result: failed\nReflection:", "the way out is the jade door.\nReflection:"],
                    return_tensors="pt", padding=True)  # fmt: skip
    model.eval()
    with torch.no_grad():  # no min_new_tokens: it would renormalise the sampling distribution without eos
        out = model.generate(**enc, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    responses = out.sequences[:, enc["input_ids"].shape[1] :]
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    sampled = sampled.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    attention = torch.cat([enc["attention_mask"], torch.ones_like(responses)], 1)
    ppo.disable_dropout(model)
    model.train()
    with torch.no_grad():
        mine, _ = ppo.token_logprobs(model, out.sequences, attention, responses.shape[1], 0.7)
    mask = ppo.response_mask(responses, tokenizer.eos_token_id, tokenizer.pad_token_id).bool()
    assert mask.sum() >= 4
    assert torch.allclose(mine[mask], sampled[mask], atol=1e-4), (mine - sampled)[mask].abs().max()


def test_config_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(ConfigError, match="num_samples_per_prompt=1 must be >= 2"):
        make_cfg(tiny, tmp_path, num_samples_per_prompt=1)
    with pytest.raises(ConfigError, match="minibatch_size=3 must divide"):
        make_cfg(tiny, tmp_path, minibatch_size=3)
    with pytest.raises(ConfigError, match="clip_range=1.5"):
        make_cfg(tiny, tmp_path, clip_range=1.5)
    with pytest.raises(ConfigError, match="reward_source=rm needs reward_model"):
        make_cfg(tiny, tmp_path, reward_model=None)
    with pytest.raises(ConfigError, match="reward_source=env needs env_run_dir"):
        make_cfg(tiny, tmp_path, reward_source="env")


# ----------------------------------------------------------------------------------------------------- with a model


def test_kl_is_zero_for_a_fresh_adapter(tiny, tmp_path):
    cfg = make_cfg(tiny, tmp_path, kl_coef=1.0)
    torch.manual_seed(0)
    model, tokenizer = ppo.build_policy(cfg)
    prompts = ["Result: failed\nReflection:", "the way out is the jade door.\nReflection:"]
    rows = [{"prompt": p} for p in prompts]
    batch = ppo.collect_rollout(model, tokenizer, prompts, rows, lambda p, y, r: [1.0] * len(y), cfg)
    assert batch.input_ids.shape[0] == 2 * cfg.num_samples_per_prompt
    assert batch.mask.sum() > 0
    # LoRA's B starts at zero, so the policy equals the reference exactly
    assert torch.equal(batch.logprobs, batch.ref_logprobs)
    assert torch.all(batch.kl == 0)
    assert torch.all(batch.returns == 1.0) and torch.all(batch.advantages == 0)
    assert len(batch.reflections) == 8 and all("\n\n" not in y for y in batch.reflections)


def test_first_epoch_ratio_is_one_and_the_update_favours_positive_advantages(tiny, tmp_path):
    # the log-probabilities the update starts from are those of the sampled tokens under the sampling policy (ratio
    # exactly 1 in train mode, left padding and eos/pad handling included), and one gradient step on the clipped
    # surrogate raises the log-probability of the positive-advantage reflections and lowers the negative ones
    cfg = make_cfg(tiny, tmp_path, num_samples_per_prompt=4, max_new_tokens=6, temperature=1.0, kl_coef=0.0)
    torch.manual_seed(0)
    model, tokenizer = ppo.build_policy(cfg)
    prompts = ["Result: failed\nReflection:", "Observation: the way out is the jade door.\nResult: failed\nReflection:"]
    rows = [{"prompt": p} for p in prompts]

    def reward(prompts, reflections, rows):  # any reward that tells samples apart
        return [float(i % 2) for i in range(len(reflections))]

    batch = ppo.collect_rollout(model, tokenizer, prompts, rows, reward, cfg)
    assert torch.all(batch.advantages[0::2] < 0) and torch.all(batch.advantages[1::2] > 0)
    ppo.disable_dropout(model)
    model.train()
    new, _ = ppo.token_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length, cfg.temperature)
    assert torch.equal(new * batch.mask, batch.logprobs * batch.mask)  # ratio 1 in train mode
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss, clipfrac, approx_kl = ppo.clipped_surrogate_loss(new, batch.logprobs, batch.advantages, batch.mask, 0.2)
    assert clipfrac.item() == 0.0 and approx_kl.item() == 0.0
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = ppo.token_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length, 1.0)
    delta = ((after - batch.logprobs) * batch.mask).sum(1)
    assert delta[1::2].mean() > 0 > delta[0::2].mean()


class RestrictTo:
    """Logits processor: only ``allowed`` token ids can be sampled (keeps the bandit to a few arms)."""

    def __init__(self, allowed: list[int]):
        self.allowed = torch.tensor(allowed)

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.allowed] = scores[:, self.allowed]
        return out


def arm_probability(model, tokenizer, prompt: str, arm_ids: list[int], target_id: int) -> float:
    """P(target | prompt) among the arms, exactly, from the policy's logits."""
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1, arm_ids]
    return torch.softmax(logits, -1)[arm_ids.index(target_id)].item()


def test_bandit_learns_the_rewarded_arm(tiny, tmp_path):
    # LoRA on lm_head too: a random tiny model's final RMSNorm and small tied embeddings bound the logit gap between
    # two arms (about 0.6 at best among four), so adapting the attention alone cannot make an arm near-certain.
    cfg = make_cfg(
        tiny, tmp_path, num_iterations=12, batch_size=2, num_samples_per_prompt=8, minibatch_size=8, ppo_epochs=2,
        max_new_tokens=1, learning_rate=1e-2, kl_coef=0.0, lora=LoraSettings(r=4, alpha=8, dropout=0.0,
        target_modules=["q_proj", "v_proj", "lm_head"]),
    )  # fmt: skip
    torch.manual_seed(0)
    model, tokenizer = ppo.build_policy(cfg)
    arm_ids = [tokenizer.encode(a, add_special_tokens=False)[0] for a in ARMS]
    assert len(set(arm_ids)) == len(ARMS)
    target_id = arm_ids[ARMS.index(TARGET)]
    prompts = ["Result: failed\nReflection: open", "the way out is the jade door.\nReflection: open"]

    def reward(prompts, reflections, rows):
        return [1.0 if y.startswith(TARGET.strip()) else 0.0 for y in reflections]

    before = [arm_probability(model, tokenizer, p, arm_ids, target_id) for p in prompts]
    summary = ppo.train_ppo(model, tokenizer, prompts, [{"prompt": p} for p in prompts], reward, cfg,
                            logits_processor=[RestrictTo(arm_ids)])  # fmt: skip
    after = [arm_probability(model, tokenizer, p, arm_ids, target_id) for p in prompts]
    print(f"bandit P(target) before={before} after={after} iterations/s={summary['ppo/iterations_per_second']:.2f}")
    assert max(before) < 0.45
    assert min(after) > 0.8
    assert summary["rollout/reward_mean_last"] > summary["rollout/reward_mean_first"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_resume_continues_exactly_where_it_stopped(tiny, tmp_path):
    prompts = ["Result: failed\nReflection:", "the way out is the jade door.\nReflection:"]
    rows = [{"prompt": p} for p in prompts]

    def reward(prompts, reflections, rows):
        return [float(len(y) % 3) for y in reflections]

    def train(out, iterations):
        cfg = make_cfg(tiny, tmp_path, output_dir=str(out), num_iterations=iterations, save_steps=1)
        torch.manual_seed(123)  # a different LoRA init than the one the checkpoint holds
        model, tokenizer = ppo.build_policy(cfg)
        summary = ppo.train_ppo(model, tokenizer, prompts, rows, reward, cfg)
        return model, summary

    straight, _ = train(tmp_path / "straight", 3)
    _, first = train(tmp_path / "resumed", 2)
    assert first["ppo/resumed_from"] == 0
    assert (tmp_path / "resumed" / "checkpoint-1" / ppo.TRAINING_STATE).is_file()
    resumed, second = train(tmp_path / "resumed", 3)
    assert second["ppo/resumed_from"] == 2
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        if "lora_" in name:
            assert torch.allclose(a, b, atol=1e-6), name


def _lora_policy(tiny, tmp_path):
    from transformers import AutoTokenizer

    cfg = make_cfg(tiny, tmp_path, temperature=0.7, lora=LoraSettings(r=4, alpha=8))
    torch.manual_seed(0)
    model, _ = ppo.build_policy(cfg)
    ppo.disable_dropout(model)  # as in the update: LoRA dropout would make every pass differ
    with torch.no_grad():  # a LoRA update so that the adapter is not the identity
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tokenizer = AutoTokenizer.from_pretrained(tiny["lm"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return cfg, model, tokenizer


def test_grouped_logprobs_and_gradients_equal_row_by_row(tiny, tmp_path):
    # the samples of a prompt share its forward pass; log-probabilities and LoRA gradients must not change
    cfg, model, tokenizer = _lora_policy(tiny, tmp_path)
    group = 3
    prompts = ["Result: failed\nReflection:", "the way out is the jade door. Result: failed\nReflection:"]
    enc = tokenizer([p for p in prompts for _ in range(group)], return_tensors="pt", padding=True)
    torch.manual_seed(1)
    responses = torch.randint(3, 40, (len(prompts) * group, 5))
    ids = torch.cat([enc["input_ids"], responses], 1)
    attention = torch.cat([enc["attention_mask"], torch.ones_like(responses)], 1)
    grads = []
    for size in (1, group):
        model.zero_grad()
        logprobs, entropy = ppo.token_logprobs(model, ids, attention, 5, 0.7, with_entropy=True, group_size=size)
        (logprobs.sum() + entropy.sum()).backward()
        grads.append(([p.grad.clone() for p in model.parameters() if p.requires_grad], logprobs.detach()))
    (g1, lp1), (g3, lp3) = grads
    assert torch.allclose(lp1, lp3, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g3, strict=True))
    assert any(a.abs().sum() > 0 for a in g1)
    with pytest.raises(ValueError, match="groups of 4"):
        ppo.token_logprobs(model, ids, attention, 5, 0.7, group_size=4)


def test_sampling_with_a_shared_prompt_cache_writes_what_sampling_each_prompt_writes(tiny, tmp_path):
    cfg, model, tokenizer = _lora_policy(tiny, tmp_path)
    model.eval()
    prompts = [p for p in ("Result: failed\nReflection:", "the jade door.\nReflection:") for _ in range(2)]
    outs = []
    for size in (1, 2):
        torch.manual_seed(3)  # the same draws: greedy-like agreement is checked on the whole sequences
        outs.append(ppo.sample_reflections(model, tokenizer, prompts, cfg, group_size=size))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][3] == outs[1][3]


def test_minibatch_order_keeps_groups_together():
    order = ppo.minibatch_order(12, 4)
    assert sorted(order.tolist()) == list(range(12))
    for start in range(0, 12, 4):
        chunk = order[start : start + 4].tolist()
        assert chunk == list(range(chunk[0], chunk[0] + 4)) and chunk[0] % 4 == 0
