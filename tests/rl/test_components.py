"""The RL pieces on their own: tokenizer asset, tasks and rewards, GRPO math, the torch engine."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rl.engines import SamplingParams
from rl.engines.torch_engine import TorchEngine, top_p_filter
from rl.grpo import group_advantages, grpo_loss
from rl.metrics import reward_margin
from rl.model import build_model
from rl.policy import banned_token_mask, completion_mask, masked, token_logprobs
from rl.tasks import PromptSampler, get_task
from rl.tokenizer import ASSET, build_tokenizer, load_tokenizer

CPU = torch.device("cpu")


def test_shipped_tokenizer_is_what_build_tokenizer_makes():
    assert json.loads(build_tokenizer().to_str()) == json.load(open(ASSET))
    tok = load_tokenizer()
    ids = tok.encode("0912>", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 7
    assert tok.decode(ids) == "0912>"
    assert tok.decode_until_eos(tok.encode("21", add_eos=True) + [tok.pad_id, 7]) == ("21", True)
    assert tok.decode_until_eos(tok.encode("21")) == ("21", False)


@pytest.mark.parametrize(
    "task, digits, answer", [("reverse", "1234", "4321"), ("copy", "1234", "1234"), ("sort", "3141", "1134"), ("pattern", "1234", "abcd")]
)
def test_task_answers(task, digits, answer):
    t = get_task(task, 4)
    assert t.transform(digits) == answer and t.answer_length == 4 and t.prompt_length == 6


def test_reward_is_partial_credit_and_one_only_for_the_exact_answer():
    t = get_task("reverse", 4)
    p = t.sample(random.Random(0))
    assert t.reward(p, p.answer) == 1.0
    assert t.reward(p, p.answer + "17") == 1.0  # tokens past the answer are ignored
    wrong_first = ("0" if p.answer[0] != "0" else "1") + p.answer[1:]
    assert t.reward(p, wrong_first) == pytest.approx(0.75)
    assert t.reward(p, p.answer[:2]) == pytest.approx(0.5)  # an early EOS forfeits the rest
    assert t.reward(p, "") == 0.0


def test_alphabet_and_sampler_state():
    t = get_task("copy", 6, alphabet_size=2)
    s = PromptSampler(t, seed=3)
    first = s.next_batch(50)
    assert set("".join(p.prompt[:-1] for p in first)) == {"0", "1"}
    state = s.state_dict()
    second = s.next_batch(5)
    again = PromptSampler(t, seed=0)
    again.load_state_dict(state)
    assert again.next_batch(5) == second  # a resumed sampler draws what the original would have


def test_group_advantages_are_centred_and_scaled_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, 4)
    assert torch.allclose(adv[:4].sum(), torch.tensor(0.0), atol=1e-6)
    assert adv[0] > 0 and (adv[1:4] < 0).all()
    assert torch.equal(adv[4:], torch.zeros(4))  # a group with no spread teaches nothing
    assert torch.allclose(group_advantages(rewards, 4, normalize_std=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_grpo_loss_pushes_up_the_better_sample_and_is_nan_free_with_padding():
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    tokens = torch.tensor([[1, 2, 0], [3, 2, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    banned = torch.tensor([True, False, False, False, False])  # token 0 = padding, logprob -inf
    lp = torch.log_softmax(logits.masked_fill(banned, float("-inf")), -1).gather(-1, tokens[..., None]).squeeze(-1)
    lp = masked(lp, mask)
    loss, stats = grpo_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 1] < 0 and logits.grad[1, 0, 3] > 0  # descent raises token 1, lowers token 3
    assert stats["logprob_gap"] == 0.0 and stats["clip_fraction"] == 0.0


def test_grpo_clipping_stops_the_gradient_beyond_the_trust_region():
    new = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 > 1.2
    loss, stats = grpo_loss(new, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2)
    loss.backward()
    assert new.grad.item() == 0.0 and stats["clip_fraction"] == 1.0


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    ref = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    _, at_ref = grpo_loss(ref.clone(), ref, torch.zeros(1), mask, 0.2, ref_logprobs=ref, kl_coef=0.1)
    _, away = grpo_loss(ref + 0.5, ref + 0.5, torch.zeros(1), mask, 0.2, ref_logprobs=ref, kl_coef=0.1)
    assert at_ref["kl"] == 0.0 and away["kl"] > 0


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.equal(top_p_filter(probs, 0.7) > 0, torch.tensor([[True, True, False, False]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_completion_mask_covers_up_to_the_first_eos():
    eos = 2
    done = completion_mask(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 0, 0]]), eos)
    assert done.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_torch_engine_samples_reproducibly_and_scores_like_the_trainer():
    tok = load_tokenizer()
    model = build_model("qwen3", "rl_tiny", device=CPU, dtype=torch.float32, seed=1)
    banned = banned_token_mask(model.model_args.vocab_size, tok)
    engine = TorchEngine(model, device=CPU, pad_id=tok.pad_id, eos_id=tok.eos_id, banned=banned)
    prompts = torch.tensor([tok.encode("1234>", add_bos=True)] * 6)
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    a, b = engine.generate(prompts, params, seed=7), engine.generate(prompts, params, seed=7)
    assert torch.equal(a.completions, b.completions) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completions, engine.generate(prompts, params, seed=8).completions)
    # Never a banned token before EOS; logprobs finite inside the mask, zero outside.
    inside = a.mask.bool()
    assert not banned[a.completions[inside]].any()
    assert torch.isfinite(a.logprobs).all() and (a.logprobs[inside] < 0).all() and (a.logprobs[~inside] == 0).all()
    with torch.no_grad():
        expected = masked(token_logprobs(model, a.sequences(), 6, 1.0, banned), a.mask)
    assert torch.equal(a.logprobs, expected)


def test_generator_model_starts_poisoned_so_a_missed_weight_cannot_hide():
    model = build_model("llama3", "rl_tiny", device=CPU, dtype=torch.bfloat16, seed=None)
    assert all(p.isnan().all() and p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert torch.is_complex(model.freqs_cis)  # buffers keep their dtype (llama3's RoPE table is complex)


def test_reward_margin_windows():
    recs = [{"step": i, "reward_mean": r} for i, r in enumerate([0.0] * 10 + [0.5] * 5 + [1.0] * 10, start=1)]
    assert reward_margin(recs) == {"first": 0.0, "last": 1.0, "margin": 1.0}
