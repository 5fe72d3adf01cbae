"""The engine on what a model or a failure can hand it: logits that are not numbers, a group prefill that fails."""

from __future__ import annotations

import copy

import pytest
import torch

from test_engine import generate_alone, random_prompt, tiny_model, tokenizer  # noqa: F401 (fixtures)
from workers.engine import LLMEngine, SamplingParams
from workers.engine.llm_engine import NOT_FINITE_ERROR
from workers.engine.sampling import NOT_FINITE, argmax, sample

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)


def run_until_done(engine: LLMEngine, handles, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if all(handle.done.is_set() for handle in handles):
            return
        engine.step()
    raise AssertionError("engine did not finish the requests")


def overflowing_on(model, poison: int):
    """A copy of `model` whose input embedding of token `poison` is infinite: every logit after it is NaN, as after
    a float16 overflow."""
    model = copy.deepcopy(model)

    def overflow(module, args, output):
        return output.masked_fill((args[0] == poison).unsqueeze(-1), float("inf"))

    model.get_input_embeddings().register_forward_hook(overflow)
    return model


def test_rows_whose_logits_are_not_numbers_get_no_token_and_the_others_theirs():
    # Such a row read as token 0 (argmax takes NaN for the largest value; a draw from NaN probabilities is NaN): its
    # request went on to max_new_tokens on token 0, an empty answer ending "length".
    torch.manual_seed(40)
    logits = torch.randn(5, 128)
    logits[0, 70] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, :100] = float("-inf")  # masked tokens (a row that is otherwise numbers) draw as ever
    expected = argmax(logits)
    expected[:3] = NOT_FINITE
    assert torch.equal(sample(logits, [0.0] * 5, [1.0] * 5), expected)
    for _ in range(20):
        drawn = sample(logits, [0.0, 1.0, 0.7, 1.0, 0.0], [1.0, 0.9, 1.0, 1.0, 1.0], None, [0, 5, 0, 0, 0])
        assert drawn[:3].tolist() == [NOT_FINITE] * 3
        assert drawn[3] >= 100 and drawn[4] == expected[4]


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_request_whose_model_output_overflows_ends_with_an_error_and_its_batch_goes_on(
        tiny_model, tokenizer, where):  # noqa: F811
    prompt, neighbour_prompt = random_prompt(7, seed=4000), random_prompt(5, seed=4001)
    reference = generate_alone(tiny_model, prompt, 8)
    neighbour_tokens = generate_alone(tiny_model, neighbour_prompt, 12)
    # At prefill the prompt holds the overflowing token; at decode the request's own third token is it.
    poison = prompt[3] if where == "prefill" else reference[2]
    assert poison not in neighbour_prompt + neighbour_tokens
    if where == "decode":
        assert poison not in prompt + reference[:2]
    engine = LLMEngine(overflowing_on(tiny_model, poison), tokenizer)
    neighbour = engine.add_request("neighbour", neighbour_prompt, SamplingParams(temperature=0.0, max_new_tokens=12))
    greedy = engine.add_request("greedy", prompt, GREEDY)
    handles = [neighbour, greedy]
    if where == "prefill":  # a sampled request's draws need not reach the poison token: only its prompt holds it
        sampled = engine.add_request("sampled", prompt, SamplingParams(temperature=0.8, max_new_tokens=8, seed=4,
                                                                       ignore_eos=True))
        handles.append(sampled)
    run_until_done(engine, handles)
    output = greedy.wait(0)
    assert (output.finish_reason, output.error) == ("error", NOT_FINITE_ERROR)
    assert output.token_ids == ([] if where == "prefill" else reference[:3])
    assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)
    if where == "prefill":
        assert (sampled.wait(0).finish_reason, sampled.wait(0).error, sampled.wait(0).token_ids) == (
            "error", NOT_FINITE_ERROR, [])
    assert neighbour.wait(0).token_ids == neighbour_tokens
    assert engine.stats()["num_running"] == 0


def test_a_group_prefill_retried_one_by_one_takes_spare_room_once(tiny_model, tokenizer):  # noqa: F811
    # A group whose prefill fails is prefilled again one row at a time, so that only the row that fails alone fails.
    # Each of those rows took spare rows and columns up to the whole KV budget (5 x 74 positions for a 10-token
    # prompt of a 400 budget), all held until merged: over 3 budgets at once, where the group had failed for want of
    # memory perhaps.
    poison = 12345

    def refuse_poison(module, args):
        if (args[0] == poison).any():
            raise RuntimeError("out of memory")

    model = copy.deepcopy(tiny_model)
    model.get_input_embeddings().register_forward_pre_hook(refuse_poison)
    budget = 400
    engine = LLMEngine(model, tokenizer, max_batch_tokens=budget)
    prefill, held = engine.runner.prefill, []

    def recording_prefill(seqs, *args, **kwargs):
        batch, logits = prefill(seqs, *args, **kwargs)
        held.append(batch.cache.row_capacity * batch.cache.column_capacity)
        return batch, logits

    engine.runner.prefill = recording_prefill
    prompts = [random_prompt(10, seed=4100 + i) for i in range(4)]
    handles = [engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_new_tokens=20))
               for i, prompt in enumerate(prompts)]
    failing = engine.add_request("failing", [17, poison, 18], SamplingParams(temperature=0.0, max_new_tokens=20))
    engine.step()
    assert failing.wait(0).error == "model forward failed: RuntimeError: out of memory"
    assert len(held) == 4, held  # the group's own prefill failed: these are the rows one by one
    assert sum(held) <= budget + sum(len(prompt) for prompt in prompts), held
    run_until_done(engine, handles)
    for prompt, handle in zip(prompts, handles):
        assert handle.wait(0).token_ids == generate_alone(tiny_model, prompt, 20)
