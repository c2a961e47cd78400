"""Chat templates: turning a conversation into the prompt string the model was trained on.

A checkpoint ships its own template as Jinja (tokenizer_config.json "chat_template", or a chat_template.jinja file),
and `Tokenizer.apply_chat_template` renders *that* (see tokenizer.py). This module holds the renderer and the two
templates the package itself writes (for the tiny checkpoints, and for a checkpoint that ships none):

LONGCAT_CHAT_TEMPLATE -- LongCat-Flash-Chat (the "Chat Template" section of meituan-longcat/LongCat-Flash-Chat's
README; transformers' docs and tests show "[Round 0] USER:... ASSISTANT:..." with no bos):

    [Round 0] USER:{q} ASSISTANT:                                     one turn
    SYSTEM:{s} [Round 0] USER:{q} ASSISTANT:                          with a system prompt
    SYSTEM:{s} [Round 0] USER:{q0} ASSISTANT:{a0}</longcat_s> [Round 1] USER:{q1} ASSISTANT:
                                                                      earlier turns end with the eos token
Parts are joined by one space; no space after `USER:` / `ASSISTANT:`; no bos token. The model's answer ends when
it emits `</longcat_s>` (eos). Ours, written from that description: Meituan's Jinja file itself was not retrieved.

GLM_CHAT_TEMPLATE -- GLM-4.7-Flash (llama.cpp models/templates/GLM-4.7-Flash.jinja; ollama's
model/renderers/glm47_test.go lists the expected strings, "validated against tokenizer.apply_chat_template"):

    [gMASK]<sop><|system|>{s}<|user|>{q}<|assistant|><think>          thinking on (the default)
    [gMASK]<sop><|user|>{q}<|assistant|></think>                      enable_thinking=False
    ...<|user|>{q0}<|assistant|></think>{a0}<|user|>{q1}<|assistant|><think>
                                                                      past replies: reasoning dropped before the last
                                                                      user turn, unless clear_thinking=False
Tools are listed in a `<|system|>` block, calls render as `<tool_call>name<arg_key>k</arg_key><arg_value>v
</arg_value></tool_call>`, results as `<|observation|><tool_response>...</tool_response>`. Ours, written to
reproduce those published strings (tests/test_chat.py checks them); a real GLM-4.7-Flash checkpoint ships its own.

Rendering follows transformers' `apply_chat_template` (utils/chat_template_utils.py, 5.23): jinja2's sandboxed
environment with trim_blocks and lstrip_blocks, a `tojson` that does not escape HTML, `raise_exception`,
`strftime_now`; variables: messages, tools, documents, add_generation_prompt, the special tokens (bos_token, ...)
and any extra keyword (enable_thinking, clear_thinking, ...). Message keys whose value is None are dropped, and a
reasoning given as `thinking` or `reasoning` is also passed as `reasoning_content`, as transformers does.

User text is never parsed for special tokens. Before rendering, every control token that occurs in a string the
caller passed (message contents, tools, keyword values) is wrapped in two private-use characters (`mark`); after
rendering, the tokenizer encodes marked tokens as plain text and the template's own markup as tokens
(transformers' `sanitize_control_tokens=True` does the same; tests/test_chat.py compares the ids).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

from ..model.config import GLM, LONGCAT

LONGCAT_EOS = "</longcat_s>"
MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # wrap control tokens found in user-supplied strings


class ChatTemplateError(ValueError):
    """A conversation the template refuses (its raise_exception), or a template that does not compile."""


LONGCAT_CHAT_TEMPLATE = r"""{#- LongCat-Flash-Chat: SYSTEM:{s} [Round 0] USER:{q} ASSISTANT:{a}</longcat_s> [Round 1] USER:... -#}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- set turns = messages[1:] if has_system else messages -%}
{%- set roles = turns | map(attribute='role') | list -%}
{%- set ns = namespace(ok=roles | length > 0) -%}
{%- for r in roles -%}
    {%- if r != ['user', 'assistant'][loop.index0 % 2] -%}{%- set ns.ok = false -%}{%- endif -%}
{%- endfor -%}
{%- if not ns.ok or (add_generation_prompt and roles[-1] != 'user') -%}
    {{- raise_exception('a LongCat chat is [system], user, assistant, ..., user; got roles ' ~ roles) -}}
{%- endif -%}
{%- if has_system -%}{{- 'SYSTEM:' ~ messages[0].content ~ ' ' -}}{%- endif -%}
{%- for m in turns -%}
    {%- if m.role == 'user' -%}
        {{- (' ' if loop.index0 > 0 else '') ~ '[Round ' ~ loop.index0 // 2 ~ '] USER:' ~ m.content ~ ' ASSISTANT:' -}}
    {%- else -%}
        {{- m.content ~ '</longcat_s>' -}}
    {%- endif -%}
{%- endfor -%}
"""

GLM_CHAT_TEMPLATE = r"""{#- GLM-4.7-Flash: [gMASK]<sop>, then <|system|> / <|user|> / <|assistant|> / <|observation|> turns -#}
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
    {{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}
    {%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) ~ '\n' -}}{%- endfor -%}
    {{- '</tools>\n\nFor each function call, output the function name and arguments within the following XML '
        'format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>'
        '<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>' -}}
{%- endif -%}
{%- macro text(content) -%}{#- a string, or a list of strings / {"type": "text", "text": ...} parts -#}
    {%- if content is string -%}{{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}{{- part -}}{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- elif content is defined and content is not none -%}{{- content -}}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
    {%- if m.role == 'system' -%}
        {{- '<|system|>' ~ text(m.content) -}}
    {%- elif m.role == 'user' -%}
        {{- '<|user|>' ~ text(m.content) -}}
    {%- elif m.role == 'assistant' -%}
        {#- reasoning: the reasoning_content field, or a '<think>...</think>' prefix of the content -#}
        {%- set content = text(m.content) -%}
        {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
        {%- if m.reasoning_content is not string and '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {%- set keep = loop.index0 > ns.last_user or (clear_thinking is defined and not clear_thinking) -%}
        {{- '<|assistant|>' ~ ('<think>' ~ reasoning.strip() ~ '</think>' if keep and reasoning else '</think>') -}}
        {{- content.strip() -}}
        {%- for call in m.tool_calls or [] -%}
            {%- set f = call.function if call.function is defined else call -%}
            {{- '<tool_call>' ~ f.name -}}
            {%- for k, v in (f.arguments if f.arguments is mapping else {}).items() -%}
                {{- '<arg_key>' ~ k ~ '</arg_key><arg_value>' -}}
                {{- (v if v is string else v | tojson(ensure_ascii=False)) ~ '</arg_value>' -}}
            {%- endfor -%}
            {{- '</tool_call>' -}}
        {%- endfor -%}
    {%- elif m.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}
        {{- '<tool_response>' ~ text(m.content) ~ '</tool_response>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' ~ ('</think>' if enable_thinking is defined and not enable_thinking else '<think>') -}}
{%- endif -%}
"""

TEMPLATES = {LONGCAT: LONGCAT_CHAT_TEMPLATE, GLM: GLM_CHAT_TEMPLATE}


def default_chat_template(model_type: str) -> str:
    """The package's template for a model type (for checkpoints that ship none)."""
    if model_type not in TEMPLATES:
        raise ChatTemplateError(f"no chat template for model_type {model_type!r} (known: {sorted(TEMPLATES)})")
    return TEMPLATES[model_type]


# ------------------------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=16)
def compile_template(template: str):
    """Jinja source -> a compiled template, in the environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from None


def template_literals(template: str) -> str:
    """The template's own text and string constants, joined by NUL (where its markup tokens can be looked up)."""
    import jinja2.nodes

    ast = compile_template(template).environment.parse(template)
    lits = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    lits |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(lits))


def mark(obj, tokens_re: re.Pattern):
    """Wrap each control token inside user-supplied strings (recursively in lists / dict values) in the markers."""
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")  # no forged markers
        return tokens_re.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
    if isinstance(obj, dict):
        return {k: mark(v, tokens_re) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark(v, tokens_re) for v in obj]
    return obj


def _prepare(messages) -> list[dict]:
    """As transformers: drop None values; a reasoning under `thinking` / `reasoning` is also `reasoning_content`."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(template: str, messages, add_generation_prompt: bool = True, tools=None, documents=None,
                special_tokens: dict | None = None, mark_re: re.Pattern | None = None, **kwargs) -> str:
    """Render a conversation with a Jinja chat template -> the prompt string.

    special_tokens: {"bos_token": "<s>", ...} as template variables (keywords override them). mark_re: a regex of
    control tokens; occurrences inside the caller's strings come back wrapped in MARK_START / MARK_END.
    """
    import jinja2

    msgs, tools = _prepare(messages), list(tools) if tools is not None else None
    if mark_re is not None:
        msgs, tools, documents, kwargs = (mark(x, mark_re) for x in (msgs, tools, documents, kwargs))
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return compile_template(template).render(messages=msgs, tools=tools, documents=documents,
                                                 add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(str(e)) from None


def longcat_chat_prompt(messages: list[dict]) -> str:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], an optional system message first,
    then user/assistant turns alternating, ending with a user turn. -> the prompt string (generation starts after
    the final `ASSISTANT:`). Rendered from LONGCAT_CHAT_TEMPLATE, the one LongCat template."""
    return render_chat(LONGCAT_CHAT_TEMPLATE, messages, add_generation_prompt=True)


def chat_prompt(model_type: str, messages: list[dict], **kwargs) -> str:
    """The prompt for a conversation, rendered with the package's template for model_type (see TEMPLATES)."""
    return render_chat(default_chat_template(model_type), messages, add_generation_prompt=True, **kwargs)
