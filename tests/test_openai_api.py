"""The OpenAI protocol pieces without a server: streamed text equals the plain answer, stop
strings cut it, keys and model ids are checked, events end with [DONE]."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from carryon_ray.detokenize import Detokenizer, token_bytes, token_text
from carryon_ray.merged import MergedModel, SamplingParams, prompt_logprobs
from carryon_ray.openai_api import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    TextStream,
    carryon_dir,
    chat_body,
    chat_events,
    chat_prompt_ids,
    check_api_key,
    checked_token_ids,
    completion_body,
    completion_events,
    parse_request,
    resolve_model_id,
)
from carryon_ray.text_stream import Echo, echo_of

PROMPT = "Question: Natalia sold 48 clips"


def text_stream(base, *, stops: list[str] | None = None, max_tokens: int = 24) -> TextStream:
    merged = MergedModel(base)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    prompt_ids = base.tokenizer(PROMPT)["input_ids"]
    return TextStream(
        merged, prompt_ids, params, alpha=None, stops=stops or [], tokenizer=base.tokenizer
    )


def full_text(base, max_tokens: int = 24) -> str:
    merged = MergedModel(base)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    ids = merged.generate(base.tokenizer(PROMPT)["input_ids"], params)
    return base.tokenizer.decode(ids, skip_special_tokens=True)


def test_pieces_join_to_the_full_decode(tiny_base):
    stream = text_stream(tiny_base)
    pieces = list(stream)
    assert len(pieces) > 1, "nothing was streamed before the end"
    assert "".join(pieces) == full_text(tiny_base)
    assert stream.finish_reason == "length" and stream.completion_tokens == 24
    assert stream.usage()["total_tokens"] == stream.usage()["prompt_tokens"] + 24


def test_stop_string_cuts_and_is_never_streamed(tiny_base):
    full = full_text(tiny_base)
    stop = full[5:8]
    stream = text_stream(tiny_base, stops=["never-seen", stop])
    pieces = list(stream)
    assert "".join(pieces) == full[: full.find(stop)]
    assert stream.finish_reason == "stop"
    assert all(stop not in piece for piece in pieces)


def test_eos_finishes_with_stop(tiny_base):
    merged = MergedModel(tiny_base)
    prompt_ids = tiny_base.tokenizer(PROMPT)["input_ids"]
    first = merged.generate(prompt_ids, SamplingParams(max_new_tokens=1))[0]
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(first,))  # the first token ends it
    stream = TextStream(
        merged, prompt_ids, params, alpha=None, stops=[], tokenizer=tiny_base.tokenizer
    )
    assert "".join(stream) == ""
    assert stream.finish_reason == "stop" and stream.completion_tokens == 1


def test_completion_events_end_with_done(tiny_base):
    events = list(completion_events("base", text_stream(tiny_base), include_usage=True))
    assert all(event.startswith("data: ") and event.endswith("\n\n") for event in events)
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 24
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == full_text(tiny_base)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_events_open_with_the_role(tiny_base):
    events = list(chat_events("base", text_stream(tiny_base)))
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == full_text(tiny_base)
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_chat_without_a_template_is_400(tiny_base):
    assert not getattr(tiny_base.tokenizer, "chat_template", None)
    with pytest.raises(APIError) as caught:
        chat_prompt_ids(tiny_base.tokenizer, [ChatMessage(role="user", content="hi")])
    assert caught.value.status == 400 and "chat template" in caught.value.message


def test_max_completion_tokens_is_max_tokens():
    body = ChatCompletionRequest(
        model="base", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7
    )
    assert body.max_tokens == 7


@pytest.mark.parametrize(
    ("expected", "header", "status"),
    [
        (None, None, None),
        (None, "Bearer anything", None),
        ("sk-1", "Bearer sk-1", None),
        ("sk-1", "bearer sk-1", None),
        ("sk-1", None, 401),
        ("sk-1", "Bearer sk-2", 401),
        ("sk-1", "Basic sk-1", 401),
        ("sk-1", "Bearer ", 401),
    ],
)
def test_api_key(expected, header, status):
    if status is None:
        check_api_key(expected, header)
        return
    with pytest.raises(APIError) as caught:
        check_api_key(expected, header)
    assert caught.value.status == 401 and caught.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "header", "result"),
    [("math", "", "math"), (None, "math", "math"), ("math", "math", "math"), ("a", "b", 400)],
)
def test_model_id_from_body_or_multiplexed_header(body, header, result):
    if result == 400:
        with pytest.raises(APIError):
            resolve_model_id(body, header)
    else:
        assert resolve_model_id(body, header) == result
    with pytest.raises(APIError):
        resolve_model_id(None, "")


@pytest.mark.parametrize("model_id", ["../x", "/abs", "a/b", "a..b", ".x", "x" * 200, "a@", "a@latest", "a@../x",
                                      "a@20260101T120000.000000000-0123abcd/..", "@20260101T120000.000000000-0123abcd",
                                      "base@20260101T120000.000000000-0123abcd"])
def test_unsafe_ids_never_reach_the_filesystem(tmp_path: Path, model_id):
    with pytest.raises(APIError) as caught:
        carryon_dir(tmp_path, model_id)
    assert caught.value.status == 400


def test_request_bodies_refuse_unknown_fields():
    with pytest.raises(ValueError, match="best_of"):
        CompletionRequest.model_validate({"model": "base", "prompt": "x", "best_of": 2})
    with pytest.raises(ValueError, match="content"):
        ChatCompletionRequest.model_validate({"model": "base", "messages": [{"role": "user"}]})


# ---------------------------------------------------------------------------------------------
# Incremental detokenization

MIXED = "naïve café — 日本語のテキスト, emoji 😀👍🏽 and Ελληνικά; Natalia sold 48 clips ✓"


@pytest.fixture(scope="module")
def saved_tokenizer(chat_model_dir):
    """The tiny model's tokenizer as a server loads it (from its saved files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_dir)


def test_incremental_detokenization_equals_full_decoding(saved_tokenizer):
    ids = saved_tokenizer(MIXED)["input_ids"]
    detokenizer = Detokenizer(saved_tokenizer)
    assert detokenizer.incremental, "a fast tokenizer should decode through DecodeStream"
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) == detokenizer.text == detokenizer.final() == MIXED
    assert saved_tokenizer.decode(ids, skip_special_tokens=True) == MIXED
    assert "" in pieces, "no token ended inside a multi-byte character: the case is not tested"
    assert all("\ufffd" not in piece for piece in pieces)


def test_detokenizer_falls_back_when_decode_cleans_up_spaces(saved_tokenizer):
    tokenizer = copy.deepcopy(saved_tokenizer)
    tokenizer.clean_up_tokenization_spaces = True
    ids = tokenizer("He said , hi . " + MIXED)["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    assert not detokenizer.incremental
    for token in ids:
        detokenizer.add(token)
    assert detokenizer.final() == tokenizer.decode(ids, skip_special_tokens=True)


def fed_stream(tokenizer, stops: list[str]) -> tuple[list[str], TextStream]:
    """A TextStream fed MIXED's ids one at a time, as a generation would hand them out."""
    stream = TextStream(
        None, [0], SamplingParams(max_new_tokens=999), alpha=None, stops=stops, tokenizer=tokenizer
    )
    pieces = []
    for token in tokenizer(MIXED)["input_ids"]:
        piece, done = stream._take(token)
        pieces.append(piece)
        if done:
            return pieces, stream
    return [*pieces, stream._rest()], stream


@pytest.mark.parametrize("stop", [None, "日本", "😀", "👍🏽 and", "clips ✓", "Ελ", "never there"])
def test_stop_strings_stay_exact_over_multibyte_text(saved_tokenizer, stop):
    pieces, stream = fed_stream(saved_tokenizer, [] if stop is None else ["zzz", stop])
    cut = MIXED.find(stop) if stop is not None and stop in MIXED else len(MIXED)
    assert "".join(pieces) == MIXED[:cut]
    assert all("\ufffd" not in piece for piece in pieces)
    assert stream.finish_reason == ("stop" if cut < len(MIXED) else "length")
    if stop is not None:  # nothing of a stop string is handed out before the cut
        assert all(stop not in piece for piece in pieces)


# ---------------------------------------------------------------------------------------------
# Log-probabilities and echo


def scored_stream(base, *, logprobs: int, stops=None, echo: Echo | None = None) -> TextStream:
    merged = MergedModel(base)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=logprobs)
    prompt_ids = base.tokenizer(PROMPT)["input_ids"]
    return TextStream(
        merged, prompt_ids, params, alpha=None, stops=stops or [], tokenizer=base.tokenizer,
        echo=echo,
    )


def test_generated_logprobs_are_the_merged_models(lively_base):
    stream = scored_stream(lively_base, logprobs=3)
    text = "".join(stream)
    tokens = [entry.token for entry in stream.logprobs]
    assert len(tokens) == stream.completion_tokens == 12
    # The prompt and answer scored again in one prefill give the same numbers.
    merged = MergedModel(lively_base)
    again = prompt_logprobs(merged, stream.prompt_ids + tokens, top=3)[-12:]
    for entry, scored in zip(stream.logprobs, again, strict=True):
        assert entry.token == scored
        assert entry.logprob == pytest.approx(scored.logprob, abs=1e-4)
        assert entry.top[0][1] >= entry.logprob and len(entry.top) == 3
        assert entry.top[0][0] == entry.token  # greedy: the token is the likeliest
    body = completion_body("base", text, stream)["choices"][0]["logprobs"]
    assert set(body) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    raw = [token_bytes(lively_base.tokenizer, token) for token in tokens]
    assert b"".join(raw).decode("utf-8", errors="replace") == text
    assert body["tokens"] == [token_text(lively_base.tokenizer, token) for token in tokens]
    assert body["text_offset"][0] == 0 and body["text_offset"] == sorted(body["text_offset"])
    assert all(len(top) <= 3 and max(top.values()) == logprob
               for top, logprob in zip(body["top_logprobs"], body["token_logprobs"], strict=True))


def test_a_closing_eos_is_listed_with_its_logprob(lively_base):
    merged = MergedModel(lively_base)
    prompt_ids = lively_base.tokenizer(PROMPT)["input_ids"]
    free = merged.generate(prompt_ids, SamplingParams(max_new_tokens=3))
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(free[2],), logprobs=1)
    stream = TextStream(
        merged, prompt_ids, params, alpha=None, stops=[], tokenizer=lively_base.tokenizer
    )
    text = "".join(stream)
    assert stream.finish_reason == "stop" and stream.completion_tokens == 3
    assert [entry.token for entry in stream.logprobs] == free
    assert stream.logprobs[-1].offset <= len(text)  # where the text ends (a partial character aside)


def test_logprobs_stop_at_a_stop_string(lively_base):
    full = "".join(scored_stream(lively_base, logprobs=0))
    stop = full[6:9]
    stream = scored_stream(lively_base, logprobs=0, stops=[stop])
    text = "".join(stream)
    tokens = completion_body("base", text, stream)["choices"][0]["logprobs"]["tokens"]
    assert text == full[: full.find(stop)]
    assert len(tokens) == len(stream.logprobs) < 12  # the tokens after the cut are not listed
    raw = b"".join(token_bytes(lively_base.tokenizer, entry.token) for entry in stream.logprobs)
    assert raw.decode("utf-8", errors="replace").startswith(text)


def test_streamed_logprobs_equal_the_plain_ones(lively_base):
    plain = scored_stream(lively_base, logprobs=2)
    whole = completion_body("base", "".join(plain), plain)["choices"][0]["logprobs"]
    events = list(completion_events("base", scored_stream(lively_base, logprobs=2)))
    chunks = [json.loads(event[6:])["choices"][0]["logprobs"] for event in events[:-1]]
    joined = {key: [item for chunk in chunks for item in chunk[key]] for key in whole}
    assert joined == whole
    chat = list(chat_events("base", scored_stream(lively_base, logprobs=2)))
    content = [
        item
        for event in chat[:-1]
        if (logprobs := json.loads(event[6:])["choices"][0]["logprobs"])
        for item in logprobs["content"]
    ]
    assert [item["logprob"] for item in content] == whole["token_logprobs"]
    assert content[0]["bytes"] == list(token_bytes(lively_base.tokenizer, plain.logprobs[0].token))
    assert [len(item["top_logprobs"]) for item in content] == [2] * 12
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_chat_body_logprobs_shape(lively_base):
    stream = scored_stream(lively_base, logprobs=0)
    body = chat_body("base", "".join(stream), stream)["choices"][0]
    assert set(body["logprobs"]) == {"content", "refusal"}
    assert [set(item) for item in body["logprobs"]["content"]] == [
        {"token", "logprob", "bytes", "top_logprobs"}
    ] * 12
    assert all(item["top_logprobs"] == [] for item in body["logprobs"]["content"])


def test_echo_scores_the_prompt_first_token_null(lively_base):
    tokenizer = lively_base.tokenizer
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    scores = prompt_logprobs(MergedModel(lively_base), prompt_ids, top=1)
    echo = echo_of(tokenizer, PROMPT, prompt_ids, scores)
    stream = scored_stream(lively_base, logprobs=1, echo=echo)
    text = "".join(stream)
    body = completion_body("base", text, stream)["choices"][0]
    logprobs = body["logprobs"]
    assert body["text"] == PROMPT + text
    assert len(logprobs["tokens"]) == len(prompt_ids) + 12
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(value, float) for value in logprobs["token_logprobs"][1:])
    assert "".join(logprobs["tokens"][: len(prompt_ids)]) == PROMPT
    assert logprobs["text_offset"][len(prompt_ids)] == len(PROMPT)
    events = list(completion_events("base", scored_stream(lively_base, logprobs=1, echo=echo)))
    first = json.loads(events[0][6:])["choices"][0]
    assert first["text"] == PROMPT and first["logprobs"]["token_logprobs"][0] is None


# ---------------------------------------------------------------------------------------------
# Request bodies: OpenAI's parameters


def refusal(model, body: dict) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_request(json.dumps(body).encode(), model)
    assert caught.value.status == 400
    return caught.value


NEUTRAL_FIELDS = {
    "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "top_k": -1,
    "best_of": 1, "suffix": "", "user": "u", "metadata": {"a": "b"}, "seed": None,
    "max_completion_tokens": 5, "logprobs": None, "echo": False, "n": 1,
}
REFUSED_FIELDS = {
    "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"50": 10}, "top_k": 40,
    "best_of": 2, "suffix": "end", "logprobs": 6, "n": 2, "max_completion_tokens": 0,
}
CHAT_NEUTRAL = {
    "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
    "parallel_tool_calls": True, "store": False, "service_tier": "auto",
    "modalities": ["text"], "logprobs": False, "functions": None,
}
CHAT_REFUSED = {
    "response_format": {"type": "json_object"}, "tools": [{"type": "function"}],
    "tool_choice": "auto", "store": True, "service_tier": "flex", "modalities": ["audio"],
    "top_logprobs": 21, "function_call": "auto",
}


def test_neutral_parameters_are_accepted():
    body = parse_request(
        json.dumps({"model": "base", "prompt": "x", **NEUTRAL_FIELDS}).encode(), CompletionRequest
    )
    assert body.max_tokens == 5
    chat = parse_request(
        json.dumps({"model": "base", "messages": [{"role": "user", "content": "x"}],
                    **CHAT_NEUTRAL}).encode(),
        ChatCompletionRequest,
    )
    assert chat.top_logprobs_count() is None


@pytest.mark.parametrize(("field", "value"), REFUSED_FIELDS.items())
def test_non_neutral_parameters_are_400_naming_them(field, value):
    error = refusal(CompletionRequest, {"model": "base", "prompt": "x", field: value})
    assert error.param == field and field in error.message


@pytest.mark.parametrize(("field", "value"), CHAT_REFUSED.items())
def test_non_neutral_chat_parameters_are_400_naming_them(field, value):
    messages = [{"role": "user", "content": "x"}]
    error = refusal(ChatCompletionRequest, {"model": "base", "messages": messages, field: value})
    assert error.param == field and field in error.message


def test_top_logprobs_needs_logprobs():
    messages = [{"role": "user", "content": "x"}]
    error = refusal(ChatCompletionRequest, {"messages": messages, "top_logprobs": 2})
    assert error.param == "top_logprobs"
    body = ChatCompletionRequest(messages=messages, logprobs=True, top_logprobs=4)
    assert body.top_logprobs_count() == 4
    assert ChatCompletionRequest(messages=messages, logprobs=True).top_logprobs_count() == 0


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hi", "hi"), ([5, 6, 7], [5, 6, 7]), (["hi"], "hi"), ([[5, 6]], [5, 6])],
)
def test_prompt_as_text_or_token_ids(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompt == expected


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], [], [True], [1, "a"], 7, [[]]])
def test_prompts_that_are_not_one_prompt_are_400(prompt):
    error = refusal(CompletionRequest, {"prompt": prompt})
    assert error.param == "prompt"
    if len(prompt if isinstance(prompt, list) else []) == 2 and prompt != [1, "a"]:
        assert "n=1" in error.message and "prompts" in error.message


def test_token_ids_outside_the_vocabulary_are_400():
    assert checked_token_ids([0, 299], 300) == [0, 299]
    with pytest.raises(APIError) as caught:
        checked_token_ids([1, 300], 300)
    assert caught.value.param == "prompt" and "300" in caught.value.message


def test_max_tokens_zero_only_with_echo():
    assert refusal(CompletionRequest, {"prompt": "x", "max_tokens": 0}).param == "max_tokens"
    body = CompletionRequest(prompt="x", max_tokens=0, echo=True, logprobs=1)
    params = body.sampling(stop_token_ids=(), limit=64, room=100)
    assert params.max_new_tokens == 0 and params.logprobs == 1
    assert CompletionRequest(prompt="x").sampling(stop_token_ids=(), limit=64, room=9).max_new_tokens == 16


def test_chat_max_tokens_defaults_to_the_rest_of_the_context():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    assert body.sampling(stop_token_ids=(), limit=64, room=200).max_new_tokens == 64
    assert body.sampling(stop_token_ids=(), limit=64, room=10).max_new_tokens == 10
    conflict = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                "max_completion_tokens": 4}
    assert refusal(ChatCompletionRequest, conflict).param == "max_completion_tokens"


def test_content_parts_are_joined_text():
    message = ChatMessage(
        role="developer",
        content=[{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
    )
    assert message.content == "one\ntwo" and message.role == "system"
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    error = refusal(ChatCompletionRequest, {"messages": [{"role": "user", "content": [image]}]})
    assert error.param == "messages.0.content" and "image_url" in error.message
    bad = [{"type": "text", "text": 5}]
    assert refusal(ChatCompletionRequest, {"messages": [{"role": "user", "content": bad}]})
