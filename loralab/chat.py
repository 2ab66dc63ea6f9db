"""Chat records for causal-LM training: rendered with the tokenizer's chat template, loss on assistant turns only.

A record is {"messages": [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...]} with at least
one assistant message.  The whole conversation is rendered once, `text = template(messages)`, and tokenized
with character offsets.  The text assistant message i adds is found by rendering prefixes:

    start_i = len(template(messages[:i], add_generation_prompt=True))   # up to where the reply begins
    end_i   = len(template(messages[:i + 1]))                           # the reply and its end-of-turn mark

A token is a target (its label is its own id) when its first character lies in some [start_i, end_i); every
other token — system and user text, role headers, the generation prompt — has label -100.  So the loss covers
each reply and what the template closes the turn with (`<|im_end|>`, `</s>`): the model learns to stop.  A
template that renders earlier turns differently once later ones follow (so a prefix is not a prefix of the
whole) is refused with a clear error rather than guessed at.

Without a chat template (a base model's tokenizer) the conversation is rendered with FALLBACK_TEMPLATE:

    system: Answer briefly.
    user: How far is Oslo from Bergen?
    assistant: About 460 km.</s>

one line per message, `role: content`, each assistant reply closed by the tokenizer's eos token (the loss
covers "About 460 km.</s>").  Use the same format at inference: end the prompt with "\\nassistant: ".
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["FALLBACK_TEMPLATE", "check_messages", "has_chat_template", "chat_example"]

FALLBACK_TEMPLATE = ("{{ bos_token if bos_token else '' }}"
                     "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}{{ m['role'] }}: {{ m['content'] }}"
                     "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '\\n' }}assistant: {% endif %}")
IGNORE_INDEX = -100


def check_messages(record: dict, source: str = "data") -> None:
    """Refuse a malformed chat record, naming its line: messages must be a non-empty list of {role, content}
    strings with at least one assistant message."""
    where = f"{source}, line {record.get('_line', '?')}"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}}, "
                         f"got {type(messages).__name__}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {n} must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to learn (the loss is on assistant turns "
                         f"only); roles found: {sorted({m['role'] for m in messages})}")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: Sequence[dict], template: str | None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict], source: str = "data") -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character span of each assistant turn])."""
    template = None if has_chat_template(tokenizer) else FALLBACK_TEMPLATE
    text = _render(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], template)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(f"{source}: the tokenizer's chat template renders the conversation before assistant "
                             f"message {i} differently once later messages follow, so the reply's tokens cannot be "
                             f"located; train on {{\"prompt\", \"completion\"}} records instead, or split the "
                             f"conversation at that reply")
        spans.append((len(before), len(through)))
    return text, spans


def chat_example(tokenizer, messages: Sequence[dict], source: str = "data") -> tuple[list[int], list[int]]:
    """(input_ids [T], labels [T]) of one conversation: labels are the ids on assistant turns, -100 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, source)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [s for s, _ in enc["offset_mapping"]]
        inside = [any(a <= s < b for a, b in spans) for s in starts]
    else:  # a slow tokenizer has no offsets: the token counts of the text before each boundary
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        inside = [False] * len(ids)
        for a, b in spans:
            lo, hi = (len(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) for c in (a, b))
            inside[lo:hi] = [True] * (hi - lo)
    return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, inside)]
