"""Request bodies of the OpenAI-compatible API (pydantic v2), with the ranges the server accepts.

Contract: `ChatRequest` (POST /v1/chat/completions), `CompletionRequest` (POST /v1/completions),
`TokenizeRequest` (POST /tokenize). Ranges follow the OpenAI spec (temperature 0..2, top_p 0..1,
stop up to 4 strings, seed in int64); qtool extras as in vLLM: `top_k` (0 or -1 = off),
`ignore_eos`, `return_token_ids` (each choice also carries the generated `token_ids`). Unknown fields are accepted and ignored (`extra="allow"`); a wrong type or an
out-of-range value is a 400 from the app's validation handler. `n` must be 1.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

INT64 = dict(ge=-(2 ** 63), le=2 ** 63 - 1)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    n: Optional[int] = Field(1, ge=1, le=1)
    seed: Optional[int] = Field(None, **INT64)
    stop: Optional[Union[str, list[str]]] = Field(None)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    max_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31)

    def stop_list(self) -> list[str]:
        s = self.stop
        items = [s] if isinstance(s, str) else list(s or [])
        if len(items) > 4:
            raise ValueError("stop: at most 4 sequences")
        return [x for x in items if x]


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(p.text or "" for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1, le=2 ** 31)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1, le=1)
    suffix: Optional[str] = None


class TokenizeRequest(_Body):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = None
    add_special_tokens: bool = True
