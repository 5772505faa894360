"""The OpenAI protocol pieces without a server: streamed text equals the plain answer, stop
strings cut it, keys and model ids are checked, events end with [DONE]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carryon_ray.merged import MergedModel, SamplingParams
from carryon_ray.openai_api import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    TextStream,
    carryon_dir,
    chat_events,
    chat_prompt_ids,
    check_api_key,
    completion_events,
    resolve_model_id,
)

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


@pytest.mark.parametrize("model_id", ["../x", "/abs", "a/b", "a..b", ".x", "x" * 200])
def test_unsafe_ids_never_reach_the_filesystem(tmp_path: Path, model_id):
    with pytest.raises(APIError) as caught:
        carryon_dir(tmp_path, model_id)
    assert caught.value.status == 400


def test_request_bodies_refuse_unknown_fields():
    with pytest.raises(ValueError, match="best_of"):
        CompletionRequest.model_validate({"model": "base", "prompt": "x", "best_of": 2})
    with pytest.raises(ValueError, match="content"):
        ChatCompletionRequest.model_validate({"model": "base", "messages": [{"role": "user"}]})
