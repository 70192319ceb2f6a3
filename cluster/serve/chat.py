"""Chat prompts in the Mixtral instruct format, rendered by mistral-common."""

from __future__ import annotations

from pathlib import Path

from cluster.errors import UserError

# The system prompt the Mistral 7B paper recommends for guardrailing (arXiv 2310.06825, section 5).
GUARDRAIL_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)


class ChatRenderer:
    """Turns OpenAI-style messages into prompt token ids (with BOS), optionally guardrailed."""

    def __init__(self, checkpoint: str | Path, *, guardrail: bool = False) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        model = Path(checkpoint) / "tokenizer.model"
        if not model.is_file():
            raise UserError(f"{checkpoint} has no tokenizer.model, so chat prompts cannot be rendered in the Mixtral format")
        self.tokenizer = MistralTokenizer.from_file(str(model))
        self.guardrail = guardrail

    def render(self, messages: list[dict[str, str]], *, guardrail: bool | None = None) -> list[int]:
        """The messages' prompt token ids; `guardrail` overrides the renderer's own setting."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        converted = [kinds[m["role"]](content=m["content"]) for m in messages]
        if self.guardrail if guardrail is None else guardrail:
            converted.insert(0, SystemMessage(content=GUARDRAIL_PROMPT))
        try:
            return self.tokenizer.encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens
        except MistralCommonException as e:
            raise UserError(f"messages: {e}") from None
