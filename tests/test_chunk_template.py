"""ChunkTemplate renders the same JSON as the response models for any text and usage."""
import json

from hypothesis import given
from hypothesis import strategies as st

from deployments.protocol import (ChatChunkChoice, ChatCompletionChunk, CompletionChoice, CompletionResponse,
                                  DeltaMessage, PromptTokensDetails, Usage)
from deployments.streaming import TEXT_SLOT, ChunkTemplate

texts = st.text(st.characters(exclude_categories=("Cs",)))  # what a detokenizer can give: no lone surrogates
counts = st.integers(0, 2**31)


def chat_event(text: str, index: int, usage: Usage | None) -> str:
    chunk = ChatCompletionChunk(id="chatcmpl-x", created=7, model="m\"odel",
                                choices=[ChatChunkChoice(index=index, delta=DeltaMessage(content=text))], usage=usage)
    return f"data: {chunk.model_dump_json()}\n\n"


def completion_event(text: str, index: int, usage: Usage | None) -> str:
    chunk = CompletionResponse(id="cmpl-x", created=7, model="m", choices=[CompletionChoice(index=index, text=text)],
                               usage=usage)
    return f"data: {chunk.model_dump_json()}\n\n"


def parsed(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[6:])


@given(texts, st.integers(0, 5), st.none() | st.tuples(counts, counts, counts))
def test_a_rendered_chunk_equals_the_models_rendering(text, index, usage):
    model_usage = None if usage is None else Usage(
        prompt_tokens=usage[0], completion_tokens=usage[1], total_tokens=usage[0] + usage[1],
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage[2]))
    for render in (chat_event, completion_event):
        template = ChunkTemplate(render(TEXT_SLOT, index, None))
        assert parsed(template.render(text, usage)) == parsed(render(text, index, model_usage))
