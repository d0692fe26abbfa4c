"""A prompt as a user turn of the tokenizer's chat template, for a whole dataset at once; a conversation
(TRL's conversational prompts: a list of role/content turns) rendered by the same template.

Rendering the template is ~50 us of jinja per row: 50 s of start-up for a dataset of a million rows. Most
templates put a user turn's content in verbatim, so the turn is rendered once around a marker and each prompt
goes between the two sides. The shortcut is taken only when probes (surrounding whitespace, braces, jinja and
special-token look-alikes) come out as that plain substitution, and the first prompt of every batch is still
rendered in full and compared; at the first difference every prompt is rendered in full from then on.
"""
from __future__ import annotations

from typing import Any

MARKER = "PROMPT-MARKER-5f3a9c"  # text no template writes itself
PROBES = ("x", "  leading and trailing whitespace \n", "{braces} {{ jinja }} {% raw %}", "<|im_end|></think>\n\nlast")


class ChatTurn:
    """Wraps prompts as a user turn (after an optional system turn), ending with the generation prompt."""

    def __init__(self, tokenizer: Any, system_prompt: str | None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.sides = self._sides()

    def render(self, text: str) -> str:
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def conversation(self, turns: list[dict[str, str]]) -> str:
        """A prompt in conversational form, rendered with the generation prompt; the system prompt goes first
        where the conversation has no system turn of its own."""
        own_system = turns[0]["role"] == "system"
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt and not own_system else []
        return self.tokenizer.apply_chat_template(head + turns, tokenize=False, add_generation_prompt=True)

    def wrap(self, texts: list[str]) -> list[str]:
        """Each text as the template renders it."""
        if self.sides is not None and texts and self._substituted(texts[0]) != self.render(texts[0]):
            self.sides = None  # the template treats some content apart: no shortcut
        if self.sides is None:
            return [self.render(t) for t in texts]
        return [self._substituted(t) for t in texts]

    @property
    def substitutes(self) -> bool:
        return self.sides is not None

    def _substituted(self, text: str) -> str:
        assert self.sides is not None  # callers check it
        return self.sides[0] + text + self.sides[1]

    def _sides(self) -> tuple[str, str] | None:
        """The text before and after a turn's content, when the template puts content in verbatim."""
        rendered = self.render(MARKER)
        if rendered.count(MARKER) != 1:
            return None
        before, after = rendered.split(MARKER)
        if any(self.render(probe) != before + probe + after for probe in PROBES):
            return None
        return before, after


def as_conversation(value: Any) -> list[dict[str, str]] | None:
    """A prompt in TRL's conversational form, a list of {"role": ..., "content": text} turns (other keys, such as
    the nulls a table gives turns without them, dropped); None for anything else."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
               for t in value):
        return None
    return [{"role": t["role"], "content": t["content"]} for t in value]
