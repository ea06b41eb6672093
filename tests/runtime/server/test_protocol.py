"""Request models: OpenAI's fields, unknown fields ignored, known-but-unsupported ones refused by name."""
import pydantic
import pytest

from flexc.runtime.server.protocol import ChatCompletionRequest, CompletionRequest, FineTuningJobCreate


def test_unsupported_fields_are_refused_not_ignored():
    """n>1, logprobs, tools, penalties and JSON response formats are 400s naming the field; 'user' is ignored."""
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest(**base, user="u", presence_penalty=0).n == 1
    for extra in ({"n": 2}, {"logprobs": True}, {"tools": [{"type": "function"}]}, {"frequency_penalty": 0.5},
                  {"response_format": {"type": "json_object"}}):
        with pytest.raises(pydantic.ValidationError, match=next(iter(extra))):
            ChatCompletionRequest(**base, **extra)


def test_prompts_stops_and_hyperparameters():
    """One prompt (text, token ids, or a list of one), up to 4 non-empty stops; 'auto' hyperparameters resolve to
    flexc's defaults and out-of-range ones are refused."""
    assert CompletionRequest(model="m", prompt=["hi"]).prompt == "hi"
    assert CompletionRequest(model="m", prompt=[[1, 2]]).prompt == [1, 2]
    assert CompletionRequest(model="m", prompt="x", stop="a").stop == ["a"]
    for bad in ({"prompt": ["a", "b"]}, {"prompt": ""}, {"prompt": "x", "stop": ["a"] * 5}):
        with pytest.raises(pydantic.ValidationError):
            CompletionRequest(model="m", **{"prompt": "x", **bad})
    job = FineTuningJobCreate(model="m", training_file="file-x",
                              method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}})
    assert job.hyper().resolved() == {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0}
    with pytest.raises(pydantic.ValidationError, match="n_epochs"):
        FineTuningJobCreate(model="m", training_file="f", hyperparameters={"n_epochs": 0})
    with pytest.raises(pydantic.ValidationError):
        FineTuningJobCreate(model="m", training_file="f", method={"type": "dpo"})
