"""Continuous batching: requests that join and leave a running batch at chosen steps get exactly the tokens
`pipe.generate` gives them alone (greedy, and sampling with a seed); cancelled and timed-out rows leave and free
their memory; a failing request fails alone; a model without cross-attention (Idefics2) batches the same way.

The engine is driven by hand (`submit` + `iterate`) so the joins happen at known steps."""

from __future__ import annotations

import queue

import pytest
import torch

import idefics
from tests.helpers import random_image
from tests.serving.helpers import one_thread, pipe  # noqa: F401  (shared fixtures)
from idefics.serving.engine import Engine, ErrorEvent, Job
from idefics.serving.inputs import image_policy, prepare
from idefics.serving.protocol import GenerationRequest, Limits


def prompts():
    a, b, c = random_image(1, (40, 30)), random_image(2, (20, 50)), random_image(3, (64, 64))
    return [["User:", a, "Describe this image.<end_of_utterance>\nAssistant:"],
            ["Once upon a time, a rooster stood on money. The quick brown fox jumps over the lazy dog"],
            ["The quick", b, c, "brown fox"],
            ["User:", c, "How many apples are there?<end_of_utterance>\nAssistant:"]]


def job_for(pipe, prompt, **kwargs) -> tuple[Job, queue.Queue]:
    inputs = pipe.processor(prompt)
    events: queue.Queue = queue.Queue()
    return Job(inputs, pipe.params(**kwargs), events.put), events


def drain(events: queue.Queue):
    """All events of a finished job: (tokens, result or error)."""
    tokens = []
    while not events.empty():
        event = events.get()
        if isinstance(event, ErrorEvent):
            return tokens, event
        tokens.append(event.token.id)
        if event.done is not None:
            return tokens, event.done
    return tokens, None


def run_until_idle(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.rows and not engine.waiting:
            return
        engine.iterate()
    raise AssertionError("the engine did not finish")


def test_joining_and_leaving_requests_get_the_tokens_they_get_alone(pipe):
    settings = [dict(max_new_tokens=12), dict(max_new_tokens=20, repetition_penalty=1.3),
                dict(max_new_tokens=7), dict(max_new_tokens=15, stop_token_ids=[])]
    engine = Engine(pipe, max_batch_size=8)
    pipe.image_cache.clear()
    vision_calls = []
    hook = pipe.model.model.vision_model.register_forward_hook(lambda _m, args, _o: vision_calls.append(args[0].shape[0]))
    jobs = [job_for(pipe, p, **s) for p, s in zip(prompts(), settings)]
    engine.submit(jobs[0][0])
    for _ in range(3):
        engine.iterate()
    engine.submit(jobs[1][0])  # joins a batch three steps in, with a longer prompt (the cache is left-padded)
    engine.iterate()
    engine.iterate()
    engine.submit(jobs[2][0])  # two images: the cross-attention keys/values are padded to more images
    engine.submit(jobs[3][0])
    sizes = []
    while engine.rows or engine.waiting:
        engine.iterate()
        sizes.append(len(engine.rows))
    hook.remove()
    # once per request with new images (two in one call), never per step; the last request's image was
    # seen by the third one, so the image-feature cache serves it
    assert vision_calls == [1, 2] and pipe.image_cache.hits >= 1
    assert max(sizes) == 4 and sizes[-1] == 0 and engine.in_flight == 0
    assert any(a > b > 0 for a, b in zip(sizes, sizes[1:]))  # some left while others kept going
    for prompt, kwargs, (_, events) in zip(prompts(), settings, jobs):
        tokens, result = drain(events)
        alone = pipe.generate_detailed([prompt], **kwargs)[0]
        assert tokens == alone.token_ids
        assert result.generated_text == alone.text and result.finish_reason == alone.finish_reason
        assert result.prompt_tokens == alone.prompt_tokens
        assert [t.id for t in result.tokens] == tokens


def test_sampling_with_a_seed_inside_a_batch_matches_sampling_alone(pipe):
    engine = Engine(pipe, max_batch_size=4)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_p=0.9, top_k=50, temperature=0.8, seed=1234)
    sampled = job_for(pipe, prompts()[0], **kwargs)
    greedy = job_for(pipe, prompts()[1], max_new_tokens=14)
    engine.submit(greedy[0])
    engine.iterate()
    engine.submit(sampled[0])
    run_until_idle(engine)
    tokens, result = drain(sampled[1])
    assert tokens == pipe.generate_detailed([prompts()[0]], **kwargs)[0].token_ids
    assert result.seed == 1234
    assert drain(greedy[1])[0] == pipe.generate_detailed([prompts()[1]], max_new_tokens=14)[0].token_ids


def test_cancelled_request_leaves_the_batch_and_frees_its_rows(pipe):
    engine = Engine(pipe, max_batch_size=4)
    jobs = [job_for(pipe, p, max_new_tokens=30, stop_token_ids=[]) for p in prompts()[:3]]
    for job, _ in jobs:
        engine.submit(job)
    engine.iterate()
    assert engine.state.cache.kv.keys.shape[1] == 3
    jobs[1][0].cancel()
    engine.iterate()  # dropped at the next step
    assert len(engine.rows) == 2 and engine.state.cache.kv.keys.shape[1] == 2 and engine.in_flight == 2
    assert all(k.shape[0] == 2 for k, _ in engine.state.cache.cross_kv)
    # the longest prompt's padding columns are trimmed once no remaining row needs them
    assert not bool((engine.state.mask == 0).all(0).any())
    run_until_idle(engine)
    assert engine.in_flight == 0 and engine.state is None
    tokens, result = drain(jobs[1][1])
    assert result is None and 1 <= len(tokens) < 30  # no final event: the client is gone
    alone = pipe.generate_detailed([prompts()[2]], max_new_tokens=30, stop_token_ids=[])[0]
    assert drain(jobs[2][1])[0] == alone.token_ids


def test_timeout_and_failures_stay_with_their_request(pipe):
    engine = Engine(pipe, max_batch_size=4)
    late, late_events = job_for(pipe, prompts()[0], max_new_tokens=5)
    late.deadline = 0.0  # already past: refused when it would join
    broken, broken_events = job_for(pipe, prompts()[1], max_new_tokens=5)
    broken.inputs["input_ids"] = broken.inputs["input_ids"] + 10**6  # out of the vocabulary: prefill fails
    fine, fine_events = job_for(pipe, prompts()[3], max_new_tokens=5)
    for job in (late, broken, fine):
        engine.submit(job)
    run_until_idle(engine)
    assert drain(late_events)[1].status == 504
    error = drain(broken_events)[1]
    assert error.status == 424 and "Request failed during generation" in error.message
    assert drain(fine_events)[0] == pipe.generate_detailed([prompts()[3]], max_new_tokens=5)[0].token_ids
    assert engine.in_flight == 0


def test_queue_bound(pipe):
    engine = Engine(pipe, max_batch_size=1, max_queue=1)
    engine.submit(job_for(pipe, prompts()[1], max_new_tokens=2)[0])
    engine.submit(job_for(pipe, prompts()[1], max_new_tokens=2)[0])
    from idefics.serving.engine import Overloaded
    with pytest.raises(Overloaded):
        engine.submit(job_for(pipe, prompts()[1], max_new_tokens=2)[0])
    run_until_idle(engine)
    engine.submit(job_for(pipe, prompts()[1], max_new_tokens=2)[0])  # room again once they finished


def test_server_side_preparation_equals_the_processor(pipe):
    # prepare() builds inputs without Processor.__call__ (so prompt text is never read as an image URL);
    # the result must be the processor's, image for image.
    import base64
    import io

    image = random_image(5, (33, 21))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    items = [("text", "User: "), ("image", uri), ("text", " What is it?<end_of_utterance>\nAssistant:")]
    limits = Limits(max_total_tokens=256, max_input_tokens=255)
    prepared = prepare(pipe, GenerationRequest(items=items, max_new_tokens=4), limits, image_policy(limits, None, 1))
    expected = pipe.processor(["User: ", image, " What is it?<end_of_utterance>\nAssistant:"])
    assert prepared.inputs.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(prepared.inputs[key], expected[key], rtol=0, atol=0)
    assert prepared.params.stop_token_ids == pipe.stop_token_ids() and prepared.params.max_new_tokens == 4


def test_model_without_cross_attention_batches_too(tmp_path_factory):
    """Idefics2: image tokens live in the KV cache, `step_inputs` is empty and there is no cross_kv."""
    from tests.idefics2.test_idefics2 import build_reference_idefics2, noise_image

    folder = tmp_path_factory.mktemp("idefics2")
    build_reference_idefics2(folder, splitting=False)
    pipe2 = idefics.load(folder)
    requests = [["User:", noise_image(1, 40, 30), "Describe this image.<end_of_utterance>\nAssistant:"],
                ["The quick brown fox jumps over the lazy dog"],
                ["User:", noise_image(2, 30, 50), "What?<end_of_utterance>\nAssistant:"]]
    engine = Engine(pipe2, max_batch_size=4)
    jobs = [job_for(pipe2, p, max_new_tokens=6 + 2 * i, stop_token_ids=[]) for i, p in enumerate(requests)]
    engine.submit(jobs[0][0])
    engine.iterate()
    engine.submit(jobs[1][0])
    engine.iterate()
    engine.submit(jobs[2][0])
    run_until_idle(engine)
    for i, (prompt, (_, events)) in enumerate(zip(requests, jobs)):
        expected = pipe2.generate_detailed([prompt], max_new_tokens=6 + 2 * i, stop_token_ids=[])[0].token_ids
        assert drain(events)[0] == expected


def test_int8_model_batches_as_it_runs_alone(reference_checkpoint):
    """bf16 activations on int8 weights (fused q/k/v and gate/up, both C++ layer steps where the kernel runs):
    requests that join and leave a batch get the tokens they get alone."""
    int8 = idefics.load(reference_checkpoint("small_instruct")[0], dtype="bfloat16", quantize="int8")
    engine = Engine(int8, max_batch_size=4)
    jobs = [job_for(int8, p, max_new_tokens=5 + 2 * i, stop_token_ids=[]) for i, p in enumerate(prompts())]
    engine.submit(jobs[0][0])
    engine.iterate()
    engine.submit(jobs[1][0])
    engine.iterate()
    for job, _ in jobs[2:]:
        engine.submit(job)
    run_until_idle(engine)
    for i, (prompt, (_, events)) in enumerate(zip(prompts(), jobs)):
        expected = int8.generate_detailed([prompt], max_new_tokens=5 + 2 * i, stop_token_ids=[])[0].token_ids
        assert drain(events)[0] == expected, i
