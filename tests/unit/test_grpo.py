"""GRPO: advantages, the decoupled clipped loss by hand, importance weights, batch packing, log-prob
alignment, gradient sign on a tiny LM, the Algorithm plug-in contract."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fleetloop.errors import InvalidArgument
from learner.algorithms import ALGORITHMS, make_algorithm
from learner.llm.grpo import (GRPO, GRPOConfig, TokenBatch, build_token_batch, group_advantages, grpo_token_loss,
                              sequence_logprobs, zero_variance)


class TinyLM(nn.Module):
    """Causal toy LM with an HF-like interface: logits at t depend on tokens <= t (embedding + cumulative mean)."""

    def __init__(self, vocab: int = 16, dim: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        counts = torch.arange(1, input_ids.shape[1] + 1, device=h.device).view(1, -1, 1)
        h = h + 0.5 * torch.cumsum(h, dim=1) / counts
        return SimpleNamespace(logits=self.head(torch.tanh(h)))


def cfg(**kw):
    return GRPOConfig(**kw)


# -- advantages ---------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(r, normalize_std=True, eps=0.0)
    # row 0: mean .5, population std .5 -> +-1
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1])
    np.testing.assert_array_equal(adv[1], [0, 0, 0, 0])  # zero variance: exactly 0
    # row 2: mean .75, std sqrt(mean([2.25^2, .75^2*3])) = sqrt(1.6875)
    std = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 4)
    np.testing.assert_allclose(adv[2], [2.25 / std, -0.75 / std, -0.75 / std, -0.75 / std])
    mean_only = group_advantages(r, normalize_std=False)
    np.testing.assert_allclose(mean_only[0], [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_array_equal(mean_only[1], 0.0)
    np.testing.assert_allclose(mean_only[2], [2.25, -0.75, -0.75, -0.75])
    assert zero_variance(r).tolist() == [False, True, False]
    t = group_advantages(torch.tensor(r, dtype=torch.float32), normalize_std=True, eps=0.0)
    assert isinstance(t, torch.Tensor) and t.shape == (3, 4)
    np.testing.assert_allclose(t.numpy(), adv, rtol=1e-6)
    # eps enters the denominator
    np.testing.assert_allclose(group_advantages(r[:1], True, eps=0.5)[0], [0.5, -0.5, -0.5, 0.5])
    with pytest.raises(InvalidArgument, match="rewards"):
        group_advantages(np.array([1.0, 2.0]))
    with pytest.raises(InvalidArgument, match="finite"):
        group_advantages(np.array([[1.0, float("nan")]]))


# -- loss ---------------------------------------------------------------------------------------

def _two_sample_case():
    """Sample 0: prompt at 0-1, completion at 2-3, A=+1. Sample 1: prompt at 0, completion 1-2, pad 3, A=-1.
    Ratios: s0 -> 1.1 (inside), 1.5 (above 1.28: clipped); s1 -> 0.5 (below 0.8: clipped), 0.9 (inside).
    Prompt and pad positions carry wild values that the mask must hide."""
    base = torch.full((2, 4), -1.0)
    ratios = torch.tensor([[50.0, 50.0, 1.1, 1.5], [50.0, 0.5, 0.9, 1e-9]])
    logp_new = (base + torch.log(ratios)).requires_grad_(True)
    logp_prox = base.clone()
    logp_behav = base.clone()
    logp_behav[0, 0] = -50.0  # huge weight at a prompt position: masked out
    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    adv = torch.tensor([1.0, -1.0])
    return logp_new, logp_prox, logp_behav, adv, mask


def test_loss_hand_computed_clip_and_mask():
    logp_new, prox, behav, adv, mask = _two_sample_case()
    loss, per_sample, st = grpo_token_loss(logp_new, prox, behav, adv, mask, cfg())
    # token losses: -1.1, -1.28 (clipped high) | +0.8 (clipped low), +0.9
    assert loss.item() == pytest.approx((-1.1 - 1.28 + 0.8 + 0.9) / 4, abs=1e-6)
    np.testing.assert_allclose(per_sample.numpy(), [(-1.1 - 1.28) / 2, (0.8 + 0.9) / 2], atol=1e-6)
    assert st["tokens"] == 4
    assert st["clip_fraction"] == pytest.approx(0.5)
    assert st["clip_high_fraction"] == pytest.approx(0.25) and st["clip_low_fraction"] == pytest.approx(0.25)
    assert st["mean_ratio"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.9) / 4, abs=1e-6)
    assert st["mean_behaviour_weight"] == pytest.approx(1.0)
    # gradient: clipped tokens contribute nothing; d loss / d logp = -w * r * A / n_tokens elsewhere
    loss.backward()
    want = torch.zeros(2, 4)
    want[0, 2] = -1.1 / 4
    want[1, 2] = 0.9 / 4
    torch.testing.assert_close(logp_new.grad, want, atol=1e-6, rtol=1e-5)
    # sequence aggregation: per-sequence token sums, mean over sequences
    loss2, per2, _ = grpo_token_loss(logp_new, prox, behav, adv, mask, cfg(loss_agg="seq_mean_token_sum"))
    assert loss2.item() == pytest.approx(((-1.1 - 1.28) + (0.8 + 0.9)) / 2, abs=1e-6)
    np.testing.assert_allclose(per2.numpy(), [-2.38, 1.7], atol=1e-6)


def test_loss_negative_advantage_above_clip_is_not_clipped():
    # A < 0 with r above 1 + eps: min picks r * A (pessimistic), gradient flows
    logp_new = torch.log(torch.tensor([[1.0, 1.5]])).requires_grad_(True)
    zero = torch.zeros(1, 2)
    mask = torch.tensor([[False, True]])
    loss, _, st = grpo_token_loss(logp_new, zero, zero, torch.tensor([-1.0]), mask, cfg())
    assert loss.item() == pytest.approx(1.5)
    assert st["clip_fraction"] == 0.0
    loss.backward()
    assert logp_new.grad[0, 1].item() == pytest.approx(1.5)


def test_importance_weight_with_stale_behaviour_logprobs():
    mask = torch.tensor([[False, True, True, True]])
    prox = torch.full((1, 4), -2.0)
    # behaviour was a few versions old: prox - behav = log 2, -1, log 10 (capped at 5)
    behav = prox - torch.tensor([[0.0, math.log(2.0), -1.0, math.log(10.0)]])
    new = prox.clone().requires_grad_(True)  # r = 1 (start of the update)
    c = cfg(behaviour_weight_cap=5.0)
    loss, per, st = grpo_token_loss(new, prox, behav, torch.tensor([1.0]), mask, c)
    w = [2.0, math.exp(-1.0), 5.0]
    assert loss.item() == pytest.approx(-sum(w) / 3, rel=1e-6)
    assert st["mean_behaviour_weight"] == pytest.approx(sum(w) / 3, rel=1e-6)
    assert st["capped_weight_fraction"] == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(new.grad[0, 1:], -torch.tensor(w) / 3)  # weight scales the gradient, no grad through w
    # the weight is relative to the *proximal* policy: on-policy data (behav == prox) gives w = 1
    loss_on, _, st_on = grpo_token_loss(prox.clone(), prox, prox, torch.tensor([1.0]), mask, c)
    assert loss_on.item() == pytest.approx(-1.0) and st_on["mean_behaviour_weight"] == pytest.approx(1.0)
    # huge gaps do not overflow
    loss_big, _, _ = grpo_token_loss(prox.clone(), prox, prox - 1e4, torch.tensor([1.0]), mask, c)
    assert loss_big.item() == pytest.approx(-5.0)


def test_kl_term_k3_and_weights():
    mask = torch.tensor([[False, True]])
    new = torch.tensor([[0.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.5]])
    loss, _, st = grpo_token_loss(new, new.detach(), new.detach(), torch.tensor([0.0]), mask, cfg(kl_coef=0.1), logp_ref=ref)
    d = -0.5
    assert st["kl"] == pytest.approx(math.exp(d) - d - 1)
    assert loss.item() == pytest.approx(0.1 * (math.exp(d) - d - 1), rel=1e-6)
    # per-sample weights multiply the loss (token_mean still divides by the token count)
    mask2 = torch.tensor([[False, True], [False, True]])
    z = torch.zeros(2, 2)
    l_w, per_w, _ = grpo_token_loss(z.clone(), z, z, torch.tensor([1.0, 1.0]), mask2, cfg(), weights=torch.tensor([1.0, 0.0]))
    assert l_w.item() == pytest.approx(-0.5)
    np.testing.assert_allclose(per_w.numpy(), [-1.0, -1.0])  # per-sample losses are unweighted


# -- batch packing and log-probs ----------------------------------------------------------------

GROUPS = [
    {"prompt_token_ids": [1, 2, 3], "completions": [
        {"token_ids": [4, 5], "logprobs": [-0.1, -0.2], "reward": 1.0, "policy_version": 3},
        {"token_ids": [6], "logprobs": [-0.3], "reward": 0.0, "policy_version": 4}]},
    {"prompt_token_ids": [7], "completions": [
        {"token_ids": [8, 9, 10], "logprobs": [-1.0, -2.0, -3.0], "reward": 0.5, "policy_version": 4},
        {"token_ids": [11, 12, 13], "logprobs": [-0.5, -0.5, -0.5], "reward": 0.5, "policy_version": 4}]},
]


def test_build_token_batch_shapes_masks_alignment():
    b = build_token_batch(GROUPS, pad_id=0, device="cpu", adv_eps=1e-6, learner_version=5)
    assert isinstance(b, TokenBatch) and len(b) == 4
    assert b.input_ids.shape == (4, 5) and b.input_ids.dtype == torch.int64
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0], [7, 8, 9, 10, 0], [7, 11, 12, 13, 0]]
    assert b.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert b.completion_mask.tolist() == [[False, False, False, True, True], [False, False, False, True, False],
                                          [False, True, True, True, False], [False, True, True, True, False]]
    torch.testing.assert_close(b.behaviour_logprobs[0], torch.tensor([0, 0, 0, -0.1, -0.2]))
    torch.testing.assert_close(b.behaviour_logprobs[1], torch.tensor([0, 0, 0, -0.3, 0]))
    torch.testing.assert_close(b.behaviour_logprobs[2], torch.tensor([0, -1.0, -2.0, -3.0, 0]))
    torch.testing.assert_close(b.advantages, torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert b.versions.tolist() == [3, 4, 4, 4] and b.groups.tolist() == [0, 0, 1, 1]
    assert b.rewards.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert b.zero_variance_groups == 1 and b.learner_version == 5
    assert build_token_batch(GROUPS, 0, normalize_std=False).advantages.tolist() == [0.5, -0.5, 0.0, 0.0]


@pytest.mark.parametrize("mutate, field", [
    (lambda g: g[0]["completions"][1].update(logprobs=[-0.3, -0.1]), r"groups\[0\]\.completions\[1\]\.logprobs"),
    (lambda g: g[1]["completions"][0].update(reward=float("nan")), r"groups\[1\]\.completions\[0\]\.reward"),
    (lambda g: g[1]["completions"][0].update(reward=float("inf")), r"groups\[1\]\.completions\[0\]\.reward"),
    (lambda g: g[0]["completions"][0].update(token_ids=[4, 99]), r"groups\[0\]\.completions\[0\]\.token_ids"),
    (lambda g: g[0]["completions"][0].update(token_ids=[-1, 4]), r"groups\[0\]\.completions\[0\]\.token_ids"),
    (lambda g: g[0]["completions"][0].update(logprobs=[0.5, -0.1]), r"groups\[0\]\.completions\[0\]\.logprobs"),
    (lambda g: g[0]["completions"][0].update(logprobs=[float("nan"), -0.1]), r"groups\[0\]\.completions\[0\]\.logprobs"),
    (lambda g: g[0].update(prompt_token_ids=[]), r"groups\[0\]\.prompt_token_ids"),
    (lambda g: g[1].update(completions=[]), r"groups\[1\]\.completions"),
])
def test_build_token_batch_refuses_bad_input(mutate, field):
    import copy
    groups = copy.deepcopy(GROUPS)
    mutate(groups)
    with pytest.raises(InvalidArgument, match=field):
        build_token_batch(groups, pad_id=0, vocab_size=16)
    with pytest.raises(InvalidArgument, match="groups"):
        build_token_batch([], pad_id=0)


def test_sequence_logprobs_alignment_against_manual_gather():
    torch.manual_seed(0)
    model = TinyLM(vocab=16)
    ids = torch.randint(0, 16, (3, 7))
    am = torch.ones_like(ids)
    for temp in (1.0, 0.7):
        got = sequence_logprobs(model, ids, am, temperature=temp)
        assert got.shape == (3, 7) and got.dtype == torch.float32
        logits = model(input_ids=ids).logits / temp
        for i in range(3):
            assert got[i, 0].item() == 0.0
            for t in range(1, 7):
                want = torch.log_softmax(logits[i, t - 1], dim=-1)[ids[i, t]]
                assert got[i, t].item() == pytest.approx(want.item(), abs=1e-5)


# -- the algorithm ------------------------------------------------------------------------------

def _groups_from_model(model, prompt, comps, rewards, version=0, temperature=1.0):
    """Groups whose behaviour log-probs are the model's own (on-policy, at ``temperature``)."""
    out = []
    ids = [prompt + c for c in comps]
    width = max(map(len, ids))
    t = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    with torch.no_grad():
        lp = sequence_logprobs(model, t, torch.ones_like(t), temperature)
    comps_d = [{"token_ids": c, "logprobs": lp[i, len(prompt):len(prompt) + len(c)].tolist(), "reward": r,
                "policy_version": version} for i, (c, r) in enumerate(zip(comps, rewards))]
    out.append({"prompt_token_ids": prompt, "completions": comps_d})
    return out


def _completion_logp(model, prompt, comp):
    t = torch.tensor([prompt + comp])
    with torch.no_grad():
        return float(sequence_logprobs(model, t, torch.ones_like(t))[0, len(prompt):].sum())


def test_registry_config_and_staleness_default():
    assert ALGORITHMS["grpo"] is GRPO
    alg = make_algorithm("grpo", TinyLM(), {"max_staleness": 3}, "cpu")
    st = alg.default_staleness()
    assert st.bound == 3 and st.policy == "drop"
    with pytest.raises(InvalidArgument, match=r"algorithm_params\.clip_eps_low"):
        make_algorithm("grpo", TinyLM(), {"clip_eps_low": 1.5}, "cpu")
    with pytest.raises(InvalidArgument, match=r"algorithm_params\.loss_agg"):
        make_algorithm("grpo", TinyLM(), {"loss_agg": "mean"}, "cpu")
    with pytest.raises(InvalidArgument, match=r"algorithm_params\.nope"):
        make_algorithm("grpo", TinyLM(), {"nope": 1}, "cpu")


@pytest.mark.parametrize("params", [{}, {"epochs": 2, "minibatches": 2}, {"loss_agg": "seq_mean_token_sum"},
                                    {"kl_coef": 0.05}, {"normalize_std": False, "temperature": 0.8}])
def test_positive_advantage_logprob_rises(params):
    torch.manual_seed(1)
    model = TinyLM(vocab=16)
    alg = make_algorithm("grpo", model, {"lr": 0.05, **params}, "cpu")
    prompt, good, bad = [1, 2], [3, 4, 5], [6, 7, 8]
    groups = _groups_from_model(model, prompt, [good, bad, bad, good], [1.0, 0.0, 0.0, 1.0],
                                temperature=params.get("temperature", 1.0))
    before = (_completion_logp(model, prompt, good), _completion_logp(model, prompt, bad))
    batch = alg.build_batch(groups, pad_id=0, learner_version=2)
    res = alg.update(batch)
    after = (_completion_logp(model, prompt, good), _completion_logp(model, prompt, bad))
    assert after[0] > before[0] and after[1] < before[1]
    assert res.per_sample_loss.shape == (4,) and res.per_sample_loss.dtype == np.float32
    assert res.stats["skipped"] == 0.0
    steps = params.get("epochs", 1) * params.get("minibatches", 1)
    assert res.stats["optimizer_steps"] == steps and alg.step == steps
    assert res.stats["mean_staleness"] == 2.0 and res.stats["mean_reward"] == 0.5
    if steps == 1:  # on-policy, first step: ratio exactly 1, nothing clipped, w = 1
        assert res.stats["mean_ratio"] == pytest.approx(1.0) and res.stats["clip_fraction"] == 0.0
        assert res.stats["mean_behaviour_weight"] == pytest.approx(1.0, abs=1e-5)
    if "kl_coef" in params:
        assert res.stats["kl"] == pytest.approx(0.0, abs=1e-9)  # reference = initial policy
        assert alg.ref_policy is not None


def test_multi_epoch_clipping_binds_and_stale_weights_reported():
    torch.manual_seed(2)
    model = TinyLM(vocab=16)
    alg = make_algorithm("grpo", model, {"lr": 0.3, "epochs": 4, "minibatches": 1, "grad_clip": None}, "cpu")
    groups = _groups_from_model(model, [1], [[2, 3], [4, 5]], [1.0, 0.0])
    for c in groups[0]["completions"]:  # behaviour was an older policy: log-probs differ from the current ones
        c["logprobs"] = [x - 0.3 for x in c["logprobs"]]
    res = alg.update(alg.build_batch(groups, 0))
    assert res.stats["clip_fraction"] > 0.0  # later epochs moved past the trust region
    assert res.stats["mean_behaviour_weight"] == pytest.approx(math.exp(0.3), rel=1e-4)


def test_skip_when_no_signal_and_state_round_trip():
    torch.manual_seed(3)
    model = TinyLM(vocab=16)
    alg = make_algorithm("grpo", model, {"lr": 0.01}, "cpu")
    flat = _groups_from_model(model, [1], [[2], [3]], [1.0, 1.0])
    res = alg.update(alg.build_batch(flat, 0))
    assert res.stats["skipped"] == 1.0 and res.stats["zero_variance_groups"] == 1.0 and alg.step == 0
    assert res.per_sample_loss.tolist() == [0.0, 0.0]
    alg.update(alg.build_batch(_groups_from_model(model, [1], [[2], [3]], [1.0, 0.0]), 0))
    state = alg.state_dict()
    other = make_algorithm("grpo", TinyLM(vocab=16), {"lr": 0.01}, "cpu")
    other.load_state_dict(state)
    assert other.step == 1
    for (k, v), (_, w) in zip(alg.policy.state_dict().items(), other.policy.state_dict().items()):
        torch.testing.assert_close(v, w, msg=k)


def test_tiny_llama_logprobs_and_update():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    b = build_token_batch([{"prompt_token_ids": [5, 6, 7], "completions": [
        {"token_ids": [8, 9, 10, 11], "logprobs": [-1.0] * 4, "reward": 1.0, "policy_version": 0},
        {"token_ids": [12], "logprobs": [-1.0], "reward": 0.0, "policy_version": 0}]}], pad_id=0)
    model.eval()
    lp = sequence_logprobs(model, b.input_ids, b.attention_mask)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids[1:, :4]).logits[0]  # row 1 alone, unpadded
    want = torch.log_softmax(logits.float(), -1)[torch.arange(3), b.input_ids[1, 1:4]]
    torch.testing.assert_close(lp[1, 1:4], want, atol=1e-4, rtol=1e-4)  # right padding does not change real tokens
    prompt, good, bad = [5, 6, 7], [8, 9, 10, 11], [12, 13]
    groups = _groups_from_model(model, prompt, [good, bad], [1.0, 0.0])
    alg = make_algorithm("grpo", model, {"lr": 1e-2}, "cpu")
    before = _completion_logp(model, prompt, good)
    alg.update(alg.build_batch(groups, pad_id=0, vocab_size=64))
    assert _completion_logp(model, prompt, good) > before
