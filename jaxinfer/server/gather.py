"""A request's DELTA outputs put together: per prompt its tokens, per choice its text and tokens.

Completions and chat both ask the engine for deltas (each step's new tokens) and, when the client
did not ask for a stream, join them here into what one FINAL_ONLY output would have held: the
output processor's deltas concatenate exactly to the final text, never splitting a character.
A completion with several prompts numbers its choices prompt by prompt: prompt p's sample i is
choice `p * n + i`, as OpenAI and vLLM do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from jaxinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jaxinfer.server.streaming import merge

Entry = dict[int, Logprob]


@dataclass
class PromptSoFar:
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Entry | None] | None = None
    seen: bool = False

    def add(self, output: RequestOutput) -> None:
        if not self.seen:
            self.seen = True
            self.prompt = output.prompt
            self.token_ids = list(output.prompt_token_ids)
        if output.prompt_logprobs is not None:
            self.logprobs = list(output.prompt_logprobs)


@dataclass
class ChoiceSoFar:
    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Entry] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, completion: CompletionOutput) -> None:
        self.text.append(completion.text)
        self.token_ids.extend(completion.token_ids)
        if completion.logprobs:
            self.logprobs.extend(completion.logprobs)
        self.finish_reason = completion.finish_reason
        self.stop_reason = completion.stop_reason


@dataclass
class Gathered:
    prompts: list[PromptSoFar]
    choices: list[ChoiceSoFar]  # in choice-index order

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


async def gather(streams: Sequence[AsyncIterator[RequestOutput]], n: int) -> Gathered:
    prompts = [PromptSoFar() for _ in streams]
    choices = [ChoiceSoFar(index) for index in range(len(streams) * n)]
    async for prompt_index, output in merge(streams):
        prompts[prompt_index].add(output)
        for completion in output.outputs:
            choices[prompt_index * n + completion.index].add(completion)
    return Gathered(prompts, choices)
