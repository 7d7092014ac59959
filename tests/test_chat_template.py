"""Chat templates must render exactly as transformers' `apply_chat_template(..., tokenize=False)` does."""

import datetime

import pytest

from mpillm.chat_template import ChatTemplateError, render_chat_template

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
          "message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# Exercises what the environment must get right: trim_blocks/lstrip_blocks on indented block tags, namespace,
# loop controls, tojson (indent, no HTML escaping, no ASCII escaping), strftime_now, `tools is none`, dict(), extras.
FEATURES = """{%- set ns = namespace(system='', count=0) -%}
{% for m in messages %}
    {% if m.role == 'system' %}
        {% set ns.system = m.content %}
        {% continue %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    <{{ m.role }}>{{ m | tojson(indent=2) }}</{{ m.role }}>
    {% if m.content == 'STOP' %}{% break %}{% endif %}
{% endfor %}
system={{ ns.system | tojson }} count={{ ns.count }} tools_none={{ tools is none }} year={{ strftime_now('%Y') }}
{{ dict(a=1, b=[1, 2]) | tojson(sort_keys=true) }} {{ date_string | default('no date') }} {{ bos_token }}
{%- if add_generation_prompt %}

ASSISTANT:{% endif %}"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2, "features": FEATURES}

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief. <b>&'\"</b> ünï 中文"}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? 🤗\nthanks"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "STOP"}, {"role": "user", "content": "b"}],
]


def hf_render(template, messages, add_generation_prompt, **kwargs):
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = utils.render_jinja_template(conversations=[messages], chat_template=template,
                                              add_generation_prompt=add_generation_prompt, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("name, chat", [(n, c) for n in TEMPLATES for c in range(len(CHATS))
                                        if (n, c) != ("llama2", 3)])  # that chat breaks Llama 2's role alternation
@pytest.mark.parametrize("gen", [True, False])
def test_parity_with_transformers(name, chat, gen):
    messages, specials = CHATS[chat], {"bos_token": "<s>", "eos_token": "</s>"}
    ours = render_chat_template(TEMPLATES[name], messages, add_generation_prompt=gen, **specials)
    assert ours == hf_render(TEMPLATES[name], messages, gen, **specials)


def test_features_output():
    out = render_chat_template(FEATURES, CHATS[1], date_string="26 Jul 2024")
    year = datetime.datetime.now().strftime("%Y")
    assert '"content": "  What is 2+2?  "' in out  # indent=2, original spacing
    assert 'system="Be brief. <b>&\'\\"</b> ünï 中文"' in out  # neither HTML- nor ASCII-escaped
    assert f"count=1 tools_none=True year={year}" in out and "26 Jul 2024" in out
    # Lines holding only block tags vanish entirely (lstrip_blocks + trim_blocks); output lines keep their indent.
    assert out.startswith('    <user>{\n  "role"') and out.endswith("2024 \nASSISTANT:")
    assert out == hf_render(FEATURES, CHATS[1], True, date_string="26 Jul 2024")


def test_unset_special_tokens_render_empty_like_transformers():
    template = "[{{ bos_token }}]{{ messages[0].content }}[{{ eos_token }}]"
    msgs = [{"role": "user", "content": "x"}]
    assert render_chat_template(template, msgs) == "[]x[]" == hf_render(template, msgs, True)


def test_messages_are_not_mutated_and_none_keys_dropped():
    msgs = [{"role": "user", "content": "x", "name": None}]
    out = render_chat_template("{{ messages[0] | tojson }}", msgs)
    assert out == '{"role": "user", "content": "x"}' and msgs[0]["name"] is None


def test_syntax_error_names_template_and_line():
    with pytest.raises(ChatTemplateError, match=r"my template: syntax error at line 2"):
        render_chat_template("ok\n{% for %}", [{"role": "user", "content": "x"}], template_name="my template")


def test_raise_exception_reports_message_and_line():
    msgs = [{"role": "assistant", "content": "x"}]
    with pytest.raises(ChatTemplateError, match=r"chat template failed at line 1: .*roles must alternate"):
        render_chat_template(LLAMA2, msgs, bos_token="<s>", eos_token="</s>")
    template = "line one\n{{ messages[0].content.missing.attr }}"
    with pytest.raises(ChatTemplateError, match=r"failed at line 2: UndefinedError"):
        render_chat_template(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                                      "{{ namespace(_y=1) }}", "{{ messages.append(1) }}"])
def test_sandbox(template):
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, match", [
    ("hello", r"messages must be a list of dicts, got str"),
    ([], r"messages is empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\]\['role'\] must be a string \(missing\)"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}],
     r"messages\[1\]\['content'\] must be a string"),
])
def test_message_validation(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(CHATML, messages)
