"""Chat templates: turning a conversation into the prompt string the model was trained on.

LongCat-Flash-Chat (the README's "Chat Template" section of meituan-longcat/LongCat-Flash-Chat; the transformers
docs' example output "[Round 0] USER:... ASSISTANT:..."):

    [Round 0] USER:{q} ASSISTANT:                                     one turn
    SYSTEM:{s} [Round 0] USER:{q} ASSISTANT:                          with a system prompt
    SYSTEM:{s} [Round 0] USER:{q0} ASSISTANT:{a0}</longcat_s> [Round 1] USER:{q1} ASSISTANT:
                                                                      earlier turns end with the eos token
Parts are joined by one space; no space after `USER:` / `ASSISTANT:`; no bos token. The model's answer ends when
it emits `</longcat_s>` (eos).

GLM-4.7-Flash: its template could not be confirmed from public sources for the Flash model itself (the nearest
public text is a mirror of zai-org/GLM-4.7's chat_template.jinja,
https://fast.hugflare.com/zai-org/GLM-4.7/blob/main/chat_template.jinja: "[gMASK]<sop>" then "<|user|>..." /
"<|assistant|>" turns with <think> handling that depends on thinking-mode switches -- a different model's file, seen
through a third-party mirror). `chat_prompt` therefore passes GLM prompts through raw: write the special tokens
yourself, e.g. "[gMASK]<sop>hello" as transformers' GLM integration test does.
"""

from __future__ import annotations

from ..model.config import LONGCAT

LONGCAT_EOS = "</longcat_s>"


# The same template in Jinja, for transformers' apply_chat_template (written to the tiny checkpoints'
# tokenizer_config.json; tests check it renders exactly what longcat_chat_prompt returns). Ours, not Meituan's file.
LONGCAT_CHAT_TEMPLATE = (
    "{%- set ns = namespace(round=0) -%}"
    "{%- if messages[0]['role'] == 'system' -%}SYSTEM:{{ messages[0]['content'] }} {% endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if ns.round > 0 %} {% endif -%}[Round {{ ns.round }}] USER:{{ m['content'] }} ASSISTANT:"
    "{%- else -%}{{ m['content'] }}</longcat_s>{%- set ns.round = ns.round + 1 -%}{%- endif -%}"
    "{%- endfor -%}"
)


def longcat_chat_prompt(messages: list[dict]) -> str:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], an optional system message first,
    then user/assistant turns alternating, ending with a user turn. -> the prompt string (generation starts after
    the final `ASSISTANT:`)."""
    msgs = list(messages)
    parts = []
    if msgs and msgs[0]["role"] == "system":
        parts.append(f"SYSTEM:{msgs.pop(0)['content']}")
    roles = [m["role"] for m in msgs]
    if not msgs or roles != ["user", "assistant"] * (len(msgs) // 2) + ["user"]:
        raise ValueError(f"a LongCat chat is [system], user, assistant, ..., user; got roles {roles}")
    for k in range(0, len(msgs) - 1, 2):
        q, a = msgs[k]["content"], msgs[k + 1]["content"]
        parts.append(f"[Round {k // 2}] USER:{q} ASSISTANT:{a}{LONGCAT_EOS}")
    parts.append(f"[Round {len(msgs) // 2}] USER:{msgs[-1]['content']} ASSISTANT:")
    return " ".join(parts)


def chat_prompt(model_type: str, messages: list[dict]) -> str:
    """The prompt for a conversation: LongCat's template, or (GLM, template unconfirmed) the last user message raw."""
    if model_type == LONGCAT:
        return longcat_chat_prompt(messages)
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise ValueError("no user message")
    return users[-1]["content"]
