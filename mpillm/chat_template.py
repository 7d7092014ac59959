"""Chat templates: render a model's Jinja2 chat template exactly as transformers' `apply_chat_template(tokenize=False)`.

Templates ship inside model files, so they are untrusted code: they run in Jinja's immutable sandbox with the same
small set of helpers (`raise_exception`, `strftime_now`, a non-escaping `tojson`) that Hugging Face templates expect.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat_template", "validate_messages"]


class ChatTemplateError(ValueError):
    pass


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in filter HTML-escapes <, >, & and ', which would change the prompt the model was trained on.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _check_attr(name):
    # Underscore names are how sandbox escapes reach Python internals; Jinja only guards reads, not namespace stores.
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not store {name!r} on a namespace")


class _Namespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):  # no named `self`, so that namespace(self=...) still works, as in Jinja
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _check_attr(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _check_attr(name)
        super().__setitem__(name, value)


class _Dict:
    # The real `dict` type would expose its class attributes to the template; this only builds dicts.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_Dict())
    return env


@lru_cache(maxsize=16)
def _compile(template: str, template_name: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{template_name}: syntax error at line {e.lineno}: {e.message}") from None


def _template_line(exc: BaseException) -> int | None:
    # Jinja rewrites tracebacks so that frames of the compiled template carry template line numbers.
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def validate_messages(messages) -> list[dict]:
    """A copy of `messages` without None-valued keys (as transformers drops them), or ChatTemplateError."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"got {type(m[key]).__name__}"
                raise ChatTemplateError(f"messages[{i}][{key!r}] must be a string ({got})")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat_template(template: str, messages, *, add_generation_prompt: bool = True, bos_token: str | None = None,
                         eos_token: str | None = None, template_name: str = "chat template", **extra) -> str:
    """Render `messages` with `template`; `extra` becomes template variables (e.g. unk_token, tools, date_string).

    Unset special tokens stay undefined rather than None, as in transformers, so `{{ bos_token }}` renders nothing.
    `template_name` only labels errors (e.g. "tokenizer.chat_template of model.gguf").
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"{template_name} must be a string, got {type(template).__name__}")
    msgs = validate_messages(messages)
    compiled = _compile(template, template_name)
    specials = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    # transformers always passes tools/documents (None when unused); templates test them with `is not none`.
    context = {"tools": None, "documents": None, **specials, **extra,
               "messages": msgs, "add_generation_prompt": add_generation_prompt}
    try:
        return compiled.render(**context)
    except Exception as e:  # raise_exception, undefined names, and a template tripping on data (TypeError, ...)
        line = _template_line(e)
        where = f" at line {line}" if line is not None else ""
        raise ChatTemplateError(f"{template_name} failed{where}: {type(e).__name__}: {e}") from e
