"""Request and response shapes of the OpenAI API flexc serves, as pydantic models with OpenAI's field names.

Requests ignore fields they do not know (clients send ``user``, ``metadata``,
...), and refuse fields they know but flexc does not implement (``n`` > 1,
``logprobs``, ``tools``, penalties, ``echo``, ``best_of``, ``suffix``) with a
400 that names them, rather than silently answering something else.
Responses are built as plain dicts by the routes through the ``*_object``
helpers here, so every object's shape is defined in this one module.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "LoadLoraAdapterRequest",
           "UnloadLoraAdapterRequest", "FineTuningJobCreate", "Hyperparameters", "usage_object", "model_object",
           "file_object", "now"]


def now() -> int:
    """Seconds since the epoch (OpenAI's ``created`` / ``created_at``)."""
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before ``[DONE]`` with ``choices: []`` and the request's usage."""


_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
                "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "tool_choice": (None, "none"),
                "parallel_tool_calls": (None, False, True), "audio": (None,), "modalities": (None, ["text"])}


class _Sampling(_Request):
    """What completions and chat completions share."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=-(2**63), lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(default=1, ge=1, le=1, description="flexc returns one choice per request")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    """vLLM's extra parameter: keep generating past the end-of-sequence token (benchmarks, fixed lengths)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, harmless in _UNSUPPORTED.items():
                if key in data and data[key] not in harmless:
                    raise ValueError(f"{key}={data[key]!r} is not supported by this server")
            fmt = data.get("response_format")
            if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
                raise ValueError("response_format other than {'type': 'text'} is not supported by this server")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops or None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Union[str, list[str], list[int], list[list[int]]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Union[str, list[int]]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"one prompt per request is supported, got {len(v)}")
            v = v[0]
        if (isinstance(v, str) and not v) or (isinstance(v, list) and not v):
            raise ValueError("the prompt is empty")
        return v


class _TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[_TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    @property
    def output_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        """The conversation as the chat template takes it (``developer`` is the newer name of ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class LoadLoraAdapterRequest(_Request):
    """``POST /v1/load_lora_adapter`` (vLLM's fields)."""

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoraAdapterRequest(_Request):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: Optional[int] = None


class Hyperparameters(_Request):
    """A job's hyperparameters: ``auto`` or a value (flexc's meaning: the README's fine-tuning section)."""

    n_epochs: Union[Literal["auto"], int] = "auto"
    batch_size: Union[Literal["auto"], int] = "auto"
    learning_rate_multiplier: Union[Literal["auto"], float] = "auto"

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        if v != "auto" and not 1 <= v <= 50:
            raise ValueError("n_epochs must be 'auto' or an integer 1..50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if v != "auto" and not 1 <= v <= 256:
            raise ValueError("batch_size must be 'auto' or an integer 1..256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        if v != "auto" and not 0 < v <= 100:
            raise ValueError("learning_rate_multiplier must be 'auto' or a number in (0, 100]")
        return v

    def resolved(self) -> dict:
        """``auto`` replaced by flexc's defaults: 1 epoch, 1 sequence per step, multiplier 1."""
        return {"n_epochs": 1 if self.n_epochs == "auto" else self.n_epochs,
                "batch_size": 1 if self.batch_size == "auto" else self.batch_size,
                "learning_rate_multiplier": 1.0 if self.learning_rate_multiplier == "auto"
                else float(self.learning_rate_multiplier)}


class _Supervised(_Request):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class _Method(_Request):
    type: Literal["supervised"] = "supervised"
    supervised: Optional[_Supervised] = None


class FineTuningJobCreate(_Request):
    """``POST /v1/fine_tuning/jobs``."""

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: Optional[str] = Field(default=None, max_length=64)
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[_Method] = None
    suffix: Optional[str] = Field(default=None, max_length=64)
    seed: Optional[int] = Field(default=None, ge=0, le=2**31 - 1)
    metadata: Optional[dict[str, str]] = None
    integrations: Optional[list[Any]] = None

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, v: Optional[list]) -> Optional[list]:
        if v:
            raise ValueError("integrations are not supported by this server")
        return v

    def hyper(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


# ---------------------------------------------------------------------------------------------- responses
def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_object(model_id: str, created: int, *, root: Optional[str] = None, parent: Optional[str] = None,
                 version: Optional[int] = None, max_model_len: Optional[int] = None) -> dict:
    """One entry of ``GET /v1/models`` (vLLM's fields, plus the adapter ``version``)."""
    out = {"id": model_id, "object": "model", "created": created, "owned_by": "flexc", "root": root or model_id,
           "parent": parent, "permission": []}
    if max_model_len is not None:
        out["max_model_len"] = max_model_len
    if version is not None:
        out["version"] = version
    return out


def file_object(file_id: str, nbytes: int, created_at: int, filename: str, purpose: str) -> dict:
    return {"id": file_id, "object": "file", "bytes": nbytes, "created_at": created_at, "filename": filename,
            "purpose": purpose, "status": "processed", "status_details": None, "expires_at": None}
