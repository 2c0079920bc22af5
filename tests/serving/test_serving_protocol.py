"""Pure protocol translation (no model): markdown image splitting against TGI's vectors, data URIs, TGI and
OpenAI request parsing with TGI's defaults and validation, chat formatting, response and chunk shapes as the
real clients parse them."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from idefics.serving.protocol import (ApiError, Limits, chat_items, decode_data_uri, image_source,
                                      parse_chat_request, parse_json_object, parse_tgi_request, split_markdown_images)
from idefics.serving.responses import (GenerationResult, StopTextFilter, TokenInfo, chat_chunk, chat_completion,
                                       openai_error, sse, tgi_error, tgi_response, tgi_stream_event,
                                       without_stop_text)
from tests.helpers import VECTORS

VECTORS = VECTORS
LIMITS = Limits()


def markdown_vectors():
    path = VECTORS / "markdown_split_vectors.json"
    assert path.is_file(), f"reference vectors missing: {path}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", markdown_vectors(), ids=lambda c: c["input"][:30])
def test_markdown_split_matches_tgi_python_split(case):
    assert split_markdown_images(case["input"]) == [tuple(item) for item in case["python_split"]]


def test_markdown_split_more_cases():
    assert split_markdown_images("a ![](u1) b ![x](u2)") == [("text", "a "), ("image", "u1"), ("text", " b "),
                                                             ("image", "u2")]
    assert split_markdown_images("![broken](u\nv) tail") == [("text", "![broken](u\nv) tail")]
    assert split_markdown_images("![a![b](u)") == [("image", "u")]  # alt text may contain "![" (as the regex)
    assert split_markdown_images("") == []


def test_markdown_split_is_linear_on_hostile_input():
    # The reference regex backtracks quadratically here; the scan must finish quickly and keep the text.
    text = "![" * 200_000 + "](" + "x" * 1000
    assert split_markdown_images(text) == [("text", text)]
    text = "![](" + " " * 300_000
    assert split_markdown_images(text) == [("text", text)]


def test_image_sources():
    assert image_source("data:image/png;base64,AAAA") == "data"
    assert image_source("https://example.com/a.png") == "remote"
    for bad in ("file:///etc/passwd", "/etc/passwd", "ftp://host/x.png", "../x.png", "http:///nohost"):
        with pytest.raises(ApiError) as error:
            image_source(bad)
        assert error.value.status == 422 and "image" in error.value.message


def test_data_uri_strictness():
    payload = base64.b64encode(b"\x89PNG fake bytes").decode()
    assert decode_data_uri(f"data:image/png;base64,{payload}", 1000) == b"\x89PNG fake bytes"
    cases = {f"data:image/png;charset=x;base64,{payload}": "invalid image content",
             f"data:image/png,{payload}": "invalid image content",
             f"data:text/plain;base64,{payload}": "not an image type",
             "data:image/png;base64,iVBORw0KGgo": "base64",        # missing padding
             "data:image/png;base64,iVBO Rw0K Ggo=": "base64",     # whitespace
             "data:image/png;base64,iVBORw0KGgo=!!": "base64",     # junk after padding
             "data:image/png;base64,%%%%": "base64"}
    for uri, words in cases.items():
        with pytest.raises(ApiError) as error:
            decode_data_uri(uri, 1000)
        assert words in error.value.message, (uri, error.value.message)
    with pytest.raises(ApiError, match="exceeds the maximum"):
        decode_data_uri("data:image/png;base64," + "A" * 4000, 1000)


def test_tgi_request_exactly_as_the_client_sends_it():
    body = {"inputs": "![](data:image/png;base64,AAAA)Question: what? Short answer:",
            "parameters": {"do_sample": False, "max_new_tokens": 5, "repetition_penalty": None,
                           "frequency_penalty": None, "return_full_text": False, "stop": ["\n"], "seed": 0,
                           "temperature": None, "top_k": None, "top_p": None, "truncate": None, "typical_p": None,
                           "best_of": None, "watermark": False, "details": True, "decoder_input_details": False,
                           "top_n_tokens": None, "grammar": None},
            "stream": False}
    req = parse_tgi_request(body, LIMITS)
    assert req.items == [("image", "data:image/png;base64,AAAA"), ("text", "Question: what? Short answer:")]
    assert (req.max_new_tokens, req.do_sample, req.stop, req.seed, req.details) == (5, False, ["\n"], 0, True)
    assert (req.temperature, req.top_k, req.top_p, req.repetition_penalty) == (1.0, 0, 1.0, 1.0)


def test_tgi_defaults():
    # No `parameters` at all: TGI samples, 100 new tokens. `{}`: greedy. Explicit null max_new_tokens: fill.
    assert parse_tgi_request({"inputs": "hi"}, LIMITS).do_sample is True
    assert parse_tgi_request({"inputs": "hi"}, LIMITS).max_new_tokens == 100
    assert parse_tgi_request({"inputs": "hi", "parameters": {}}, LIMITS).do_sample is False
    assert parse_tgi_request({"inputs": "hi", "parameters": {"max_new_tokens": None}}, LIMITS).max_new_tokens is None
    # any warper turns sampling on, as TGI's token chooser does
    req = parse_tgi_request({"inputs": "hi", "parameters": {"do_sample": False, "top_p": 0.9}}, LIMITS)
    assert req.do_sample and req.top_p == 0.9


@pytest.mark.parametrize("body, words", [
    ({"parameters": {}}, "`inputs` is required"),
    ({"inputs": 3}, "`inputs` must be a string"),
    ({"inputs": ""}, "cannot be empty"),
    ({"inputs": "x", "parameters": []}, "`parameters` must be an object"),
    ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, "`max_new_tokens` must be an integer"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 5.0}}, "`max_new_tokens` must be an integer"),
    ({"inputs": "x", "parameters": {"max_new_tokens": True}}, "`max_new_tokens` must be an integer"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "strictly positive"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, "`max_new_tokens` must be <="),
    ({"inputs": "x", "parameters": {"temperature": 0}}, "`temperature` must be >= 0.001"),
    ({"inputs": "x", "parameters": {"temperature": 1e-300}}, "`temperature` must be >= 0.001"),
    ({"inputs": "x", "parameters": {"repetition_penalty": 1e-300}}, "`repetition_penalty` must be >= 0.01"),
    ({"inputs": "x", "parameters": {"repetition_penalty": 1e300}}, "`repetition_penalty` must be >= 0.01"),
    ({"inputs": "x", "parameters": {"top_p": 1.0}}, "`top_p` must be > 0.0 and < 1.0"),
    ({"inputs": "x", "parameters": {"top_k": -1}}, "`top_k` must be strictly positive"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "up to 4 stop sequences"),
    ({"inputs": "x", "parameters": {"stop": "a"}}, "`stop` must be a list of strings"),
    ({"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}, "`best_of` != 1"),
    ({"inputs": "x", "parameters": {"seed": -1}}, "`seed`"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {}}}}, "`grammar` is not supported"),
    ({"inputs": "x", "stream": "yes"}, "`stream` must be a boolean"),
])
def test_tgi_validation_errors_name_the_problem(body, words):
    with pytest.raises(ApiError) as error:
        parse_tgi_request(body, LIMITS)
    assert error.value.status == 422 and error.value.error_type == "validation"
    assert error.value.message.startswith("Input validation error: ") and words in error.value.message


def test_deep_nesting_is_refused_before_parsing_and_lone_surrogates_are_invalid():
    with pytest.raises(ApiError) as error:
        parse_json_object(b'{"inputs": "x", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}")
    assert error.value.status == 400 and "nests 1001 levels" in error.value.message
    # brackets inside strings (escaped quotes included) are text, not nesting
    assert parse_json_object(b'{"inputs": "[[[[\\"{{{{", "p": [[1]]}')["p"] == [[1]]
    with pytest.raises(ApiError) as error:
        parse_json_object(b'{"inputs": "\\ud800 hi"}')
    assert error.value.status == 422 and "lone surrogate" in error.value.message
    assert parse_json_object(b'{"inputs": "\\ud83d\\ude00"}')["inputs"] == "\U0001F600"  # a proper pair


def test_openai_answers_end_before_the_stop_sequence_even_when_streamed_in_pieces():
    stops = ["\nUser:", "END"]
    streamed = StopTextFilter(stops)
    pieces = [streamed.push(p) for p in ["Hello", " wor", "ld\n", "Us", "er: more"]] + [streamed.flush()]
    assert "".join(pieces) == "Hello world" and pieces[2] == "ld"  # "\n" held back until it proved a stop
    assert without_stop_text("Hello\nBye", stops) == "Hello\nBye"  # a prefix that never completes is kept
    assert without_stop_text("abc END def", stops) == "abc "


def test_openai_error_types_follow_the_status():
    assert openai_error(ApiError(424, "x", "generation"))["error"]["type"] == "server_error"
    assert openai_error(ApiError(504, "x", "timeout"))["error"]["type"] == "server_error"
    assert openai_error(ApiError(422, "x"))["error"]["type"] == "invalid_request_error"
    assert openai_error(ApiError(429, "x", "overloaded"))["error"]["type"] == "rate_limit_error"


def test_json_body_errors():
    with pytest.raises(ApiError) as error:
        parse_json_object(b"{not json")
    assert error.value.status == 400 and "parse" in error.value.message
    with pytest.raises(ApiError) as error:
        parse_json_object(b"[1, 2]")
    assert error.value.status == 422 and "JSON object" in error.value.message
    with pytest.raises(ApiError):
        parse_json_object(b"\xff\xfe")


def test_chat_format_is_idefics_instruct():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,A"}},
                                             {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "text", "text": "And "},
                                             {"type": "text", "text": "this?"},
                                             {"type": "image_url", "image_url": {"url": "https://h/x.png",
                                                                                 "detail": "low"}}]}]
    assert chat_items(messages) == [
        ("text", "System: Be brief.<end_of_utterance>\nUser:"), ("image", "data:image/png;base64,A"),
        ("text", "What is it?<end_of_utterance>\nAssistant: A cat.<end_of_utterance>\nUser: And this?"),
        ("image", "https://h/x.png"), ("text", "<end_of_utterance>\nAssistant:")]
    # markdown images in text parts are images too (the TGI client's chat() can only send those)
    assert chat_items([{"role": "user", "content": "![](u)Hi"}]) == [
        ("text", "User:"), ("image", "u"), ("text", "Hi<end_of_utterance>\nAssistant:")]


@pytest.mark.parametrize("body, words", [
    ({}, "`messages` must be a non-empty list"),
    ({"messages": []}, "`messages` must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "`messages[0].role`"),
    ({"messages": [{"role": "user", "content": 5}]}, "`messages[0].content`"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "`messages[0].content[0]`"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "image_url.url"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "`temperature`"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 1e-300}, "0 (greedy) or in [0.001, 2]"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "`max_tokens` must be strictly positive"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "`n` must be 1"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "`tools` is not supported"),
])
def test_chat_validation_errors(body, words):
    with pytest.raises(ApiError) as error:
        parse_chat_request(body, LIMITS)
    assert error.value.status == 422 and words in error.value.message


def test_chat_sampling_rules():
    base = {"messages": [{"role": "user", "content": "x"}]}
    assert parse_chat_request({**base, "temperature": 0}, LIMITS).do_sample is False
    assert parse_chat_request(base, LIMITS).do_sample is True  # absent temperature samples (OpenAI default 1)
    req = parse_chat_request({**base, "temperature": 0.5, "top_p": 0.8, "stop": "\n", "seed": -1,
                              "max_tokens": 7, "model": "anything"}, LIMITS)
    assert (req.temperature, req.top_p, req.stop, req.seed, req.max_new_tokens) == (0.5, 0.8, ["\n"], 2**64 - 1, 7)


def result(reason="eos_token"):
    tokens = [TokenInfo(5, " Paris", -0.1), TokenInfo(6, ".", -0.5), TokenInfo(2, "</s>", -0.01, special=True)]
    return GenerationResult(" Paris.", tokens, reason, prompt_tokens=9, seed=None)


def test_tgi_response_parses_with_the_real_client_types():
    types = pytest.importorskip("text_generation.types")
    req = parse_tgi_request({"inputs": "Q:", "parameters": {"details": True}}, LIMITS)
    response = types.Response(**tgi_response(result(), req))
    assert response.generated_text == " Paris." and response.details.generated_tokens == 3
    assert response.details.finish_reason == "eos_token" and response.details.tokens[2].special
    assert response.details.prefill == []
    full = parse_tgi_request({"inputs": "Q:", "parameters": {"return_full_text": True}}, LIMITS)
    assert tgi_response(result(), full) == {"generated_text": "Q: Paris."}  # no details unless asked
    events = [tgi_stream_event(1, result().tokens[0], [], req),
              tgi_stream_event(2, result().tokens[1], [], req, result())]
    parsed = [types.StreamResponse(**json.loads(sse(e, space=False)[len("data:"):])) for e in events]
    assert parsed[0].generated_text is None and parsed[0].details is None
    assert parsed[1].generated_text == " Paris." and parsed[1].details.generated_tokens == 3


def test_openai_shapes_parse_with_the_real_client_types():
    chat = pytest.importorskip("openai.types.chat")
    req = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, LIMITS)
    body = chat_completion(result(), req, "m", "chatcmpl-1", int(time.time()), "fp")
    completion = chat.ChatCompletion.model_validate(body)
    assert completion.choices[0].message.content == " Paris." and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 9 and completion.usage.completion_tokens == 3
    chunk = chat.ChatCompletionChunk.model_validate(chat_chunk("c", 1, "m", "fp", {"content": "hi"}))
    assert chunk.choices[0].delta.content == "hi"
    length = chat_completion(result("length"), req, "m", "c", 1, "fp")
    assert length["choices"][0]["finish_reason"] == "length"


def test_error_bodies():
    error = ApiError(422, "Input validation error: bad", "validation", "top_p")
    assert tgi_error(error) == {"error": "Input validation error: bad", "error_type": "validation"}
    assert openai_error(error) == {"error": {"message": "Input validation error: bad", "type": "invalid_request_error",
                                             "param": "top_p", "code": "validation"}}
    assert openai_error(ApiError(429, "Model is overloaded", "overloaded"))["error"]["type"] == "rate_limit_error"
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n' and sse({"a": 1}, space=False) == 'data:{"a": 1}\n\n'
