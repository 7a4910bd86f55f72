#!/usr/bin/env python3
"""A Shoal node renders chats with tools exactly as the reference does, and reads the calls
of that template's format back.

The reference is Jinja2 set up as Hugging Face transformers sets it up for
`apply_chat_template` (a sandboxed environment with trim_blocks and lstrip_blocks, `tojson`
as Python's `json.dumps`, `raise_exception` and `strftime_now`), fed the messages as
llama-server passes them on (a null `content` as "", each call's `arguments` parsed into an
object). The node's side is `POST /apply-template`; then the `openai` client forces a call
(`tool_choice: "required"`) and gets it back, whole and streamed.

Usage: SHOAL_ROOT_URL=http://127.0.0.1:PORT SHOAL_TEMPLATE=FILE SHOAL_BOS=… SHOAL_EOS=… \
       python3 tests/python/test_chat_templates.py

Env:
  SHOAL_ROOT_URL   the server's address, without /v1 (required)
  SHOAL_TEMPLATE   the template file the node renders with (required)
  SHOAL_BOS, SHOAL_EOS  the model's BOS and EOS token texts (default empty)
  SHOAL_ONE_CALL   set when the template takes one call per assistant turn (Llama 3.1's)
  SHOAL_AUTO_CALLS set to run AutoCalls (a model that writes calls under `auto`)

The `jinja2` and `openai` packages are required.
"""

import copy
import datetime
import json
import os
import sys
import unittest
import urllib.request

try:
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
    import openai
except ImportError as e:
    sys.stderr.write(f"FAILED: {e} (pip install jinja2 openai)\n")
    sys.exit(1)

ROOT_URL = os.environ.get("SHOAL_ROOT_URL", "").rstrip("/")
TEMPLATE = os.environ.get("SHOAL_TEMPLATE", "")
if not ROOT_URL or not TEMPLATE:
    sys.stderr.write("FAILED: set SHOAL_ROOT_URL and SHOAL_TEMPLATE\n")
    sys.exit(1)
BOS = os.environ.get("SHOAL_BOS", "")
EOS = os.environ.get("SHOAL_EOS", "")
ONE_CALL = bool(os.environ.get("SHOAL_ONE_CALL"))

client = openai.OpenAI(base_url=ROOT_URL + "/v1", api_key="sk-test", max_retries=0, timeout=600)
MODEL = client.models.list().data[0].id

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "days": {"type": "integer"},
                "hours": {"type": "array", "items": {"type": "integer"}},
            },
            "required": ["city"],
            # As agents' schemas usually say (zod's do): without it SmolLM2, which never saw
            # these formats, fills a forced call with keys of its own until max_tokens.
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


ONE_CALL_HISTORY = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"},
    {"role": "assistant", "content": "It is 12 C and raining in Paris."},
    {"role": "user", "content": "And in Tokyo, in °F?"},
]
TWO_CALL_HISTORY = [
    {"role": "user", "content": "Weather and time in Oslo?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        call("call_1", "get_weather", {"city": "Oslo", "hours": [9, 12]}),
        call("call_2", "get_time", {"city": "Oslo"}),
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    {"role": "user", "content": "Thanks. And Bergen?"},
]


def reference(messages, tools, **variables):
    """The prompt transformers' apply_chat_template renders, from the messages as
    llama-server passes them to the template, with more of the template's `variables`."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    shaped = copy.deepcopy(messages)
    for m in shaped:
        if m.get("content") is None:
            m["content"] = ""
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    with open(TEMPLATE, encoding="utf-8") as f:
        source = f.read()
    return env.from_string(source).render(
        messages=shaped, tools=tools, add_generation_prompt=True, bos_token=BOS, eos_token=EOS,
        **variables,
    )


def applied(messages, tools, kwargs=None):
    body = json.dumps({"messages": messages, "tools": tools, "chat_template_kwargs": kwargs}).encode()
    req = urllib.request.Request(
        ROOT_URL + "/apply-template", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["prompt"]


class Rendering(unittest.TestCase):
    def check(self, messages, tools):
        self.assertEqual(applied(messages, tools), reference(messages, tools))

    def test_a_first_question_with_tools(self):
        self.check([{"role": "user", "content": "Weather in Paris?"}], [WEATHER, TIME])

    def test_a_history_with_a_call_and_its_result(self):
        self.check(ONE_CALL_HISTORY, [WEATHER])

    def test_chat_template_kwargs_add_variables_but_replace_none(self):
        # Llama 3.1's `date_string` (the Llama-style template's "Today Date"); the others
        # ignore it. `messages` and `bos_token` among them change nothing.
        kwargs = {"date_string": "26 Jul 2024", "messages": [], "bos_token": "<oops>"}
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        self.assertEqual(
            applied(messages, [WEATHER], kwargs), reference(messages, [WEATHER], date_string="26 Jul 2024")
        )

    def test_a_history_with_two_calls_in_one_turn(self):
        if ONE_CALL:
            self.skipTest("this template takes one call per assistant turn")
        self.check(TWO_CALL_HISTORY, [WEATHER, TIME])


class ForcedCalls(unittest.TestCase):
    # Only a city to fill in: SmolLM2 (135M), which never saw these formats, repeats the
    # items of an open array until max_tokens.
    ask = dict(
        messages=[{"role": "user", "content": "What time is it in Paris?"}],
        tools=[TIME], tool_choice="required", temperature=0, max_tokens=80,
    )

    def test_a_forced_call_comes_back_as_a_call(self):
        r = client.chat.completions.create(model=MODEL, **self.ask)
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls", choice.message)
        self.assertEqual(len(choice.message.tool_calls), 1)
        c = choice.message.tool_calls[0]
        self.assertEqual(c.function.name, "get_time")
        args = json.loads(c.function.arguments)
        self.assertIsInstance(args.get("city"), str)

    def test_the_streamed_call_is_the_same_call(self):
        whole = client.chat.completions.create(model=MODEL, **self.ask).choices[0].message.tool_calls
        name, arguments, finish = "", "", None
        for chunk in client.chat.completions.create(model=MODEL, stream=True, **self.ask):
            if not chunk.choices:
                continue
            for tc in chunk.choices[0].delta.tool_calls or []:
                self.assertEqual(tc.index, 0)
                name += (tc.function and tc.function.name) or ""
                arguments += (tc.function and tc.function.arguments) or ""
            finish = chunk.choices[0].finish_reason or finish
        self.assertEqual(finish, "tool_calls")
        self.assertEqual(name, whole[0].function.name)
        self.assertEqual(json.loads(arguments), json.loads(whole[0].function.arguments))


class AutoCalls(unittest.TestCase):
    """Under `tool_choice: "auto"`, a Llama-3.x-format answer that opens with `{`, or with a
    code fence and `{"name"` (Qwen2.5-Coder-0.5B fences its calls in this format), is a call
    drawn under the tools' grammar (there is no tag to wait for): it parses, fits and ends
    the answer; streamed, it goes out as it is written, the arguments in several fragments.
    Run with SHOAL_AUTO_CALLS=1 (SmolLM2 never writes a call in this format)."""

    ask = dict(
        messages=[
            {"role": "system", "content": "Answer only with a JSON function call."},
            {"role": "user", "content": "What time is it in Paris?"},
        ],
        tools=[TIME], temperature=0, max_tokens=60,
    )

    def setUp(self):
        if not os.environ.get("SHOAL_AUTO_CALLS"):
            self.skipTest("set SHOAL_AUTO_CALLS=1 against a model that writes calls")

    def test_a_bare_call_under_auto_is_a_call_and_streams_as_written(self):
        whole = client.chat.completions.create(model=MODEL, **self.ask).choices[0]
        self.assertEqual(whole.finish_reason, "tool_calls", whole.message)
        self.assertEqual(len(whole.message.tool_calls), 1)
        self.assertEqual(whole.message.tool_calls[0].function.name, "get_time")
        self.assertIsInstance(json.loads(whole.message.tool_calls[0].function.arguments)["city"], str)
        name, fragments, finish = "", [], None
        for chunk in client.chat.completions.create(model=MODEL, stream=True, **self.ask):
            if not chunk.choices:
                continue
            self.assertFalse(chunk.choices[0].delta.content, "a call is no content")
            for tc in chunk.choices[0].delta.tool_calls or []:
                self.assertEqual(tc.index, 0)
                name += (tc.function and tc.function.name) or ""
                if tc.function and tc.function.arguments:
                    fragments.append(tc.function.arguments)
            finish = chunk.choices[0].finish_reason or finish
        self.assertEqual((name, finish), ("get_time", "tool_calls"))
        self.assertEqual("".join(fragments), whole.message.tool_calls[0].function.arguments)
        self.assertGreaterEqual(len(fragments), 2, fragments)


if __name__ == "__main__":
    unittest.main(verbosity=2)
