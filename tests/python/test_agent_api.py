#!/usr/bin/env python3
"""What coding agents need from a Shoal node, seen through the official `openai` client:
tool calls (asked for, forced, streamed, two in one answer, answered with the tool's
result) and JSON output that always parses. Meant for a model whose chat template renders tools (Qwen2.5-Coder).

Usage: SHOAL_BASE_URL=http://127.0.0.1:PORT/v1 python3 tests/python/test_agent_api.py

Env:
  SHOAL_BASE_URL  the server's OpenAI base URL, ending in /v1 (required)
  SHOAL_MODEL     the model id to send (default: the first id /v1/models lists)
  SHOAL_SEEDS     how many seeds the JSON-schema check runs (default 20)
  SHOAL_TWO_CALLS set to run the two-calls-in-one-answer test (a model that makes them:
                  Qwen2.5-Coder-1.5B does, the 0.5B makes one call at a time)

The `openai` package is required (`pip install openai`).
"""

import json
import os
import sys
import unittest

try:
    import openai
except ImportError:
    sys.stderr.write("FAILED: the `openai` Python package is not installed (pip install openai)\n")
    sys.exit(1)

BASE_URL = os.environ.get("SHOAL_BASE_URL", "").rstrip("/")
if not BASE_URL:
    sys.stderr.write("FAILED: set SHOAL_BASE_URL, e.g. http://127.0.0.1:8080/v1\n")
    sys.exit(1)
SEEDS = int(os.environ.get("SHOAL_SEEDS", "20"))
TWO_CALLS = bool(os.environ.get("SHOAL_TWO_CALLS"))

client = openai.OpenAI(base_url=BASE_URL, api_key="sk-test", max_retries=0, timeout=600)
MODEL = os.environ.get("SHOAL_MODEL") or client.models.list().data[0].id

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a given city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def check_call(test, call, name="get_weather"):
    test.assertEqual(call.type, "function")
    test.assertTrue(call.id.startswith("call_"), call.id)
    test.assertEqual(call.function.name, name)
    args = json.loads(call.function.arguments)
    test.assertIsInstance(args, dict)
    test.assertIsInstance(args["city"], str)
    return args


def streamed_calls(**ask):
    """The calls of a streamed answer, joined from their deltas by index, and its finish."""
    calls = {}
    finish = None
    for chunk in client.chat.completions.create(**ask, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
                entry["fragments"] = entry.get("fragments", 0) + 1
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return calls, finish


class ToolCalls(unittest.TestCase):
    def test_the_model_calls_the_tool_it_is_offered(self):
        r = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], temperature=0, max_tokens=100
        )
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls", choice.message)
        self.assertEqual(len(choice.message.tool_calls), 1)
        args = check_call(self, choice.message.tool_calls[0])
        self.assertIn("paris", args["city"].lower())

    def test_a_streamed_call_is_the_same_call(self):
        whole = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=100
        )
        calls, finish = streamed_calls(
            model=MODEL, messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=100
        )
        self.assertEqual(finish, "tool_calls")
        self.assertEqual(len(calls), 1)
        expected = whole.choices[0].message.tool_calls[0]
        self.assertEqual(calls[0]["name"], expected.function.name)
        self.assertEqual(json.loads(calls[0]["arguments"]), json.loads(expected.function.arguments))
        self.assertTrue(calls[0]["id"].startswith("call_"))
        self.assertEqual(calls[0]["arguments"], expected.function.arguments)
        if not MODEL.startswith("swarm:"):
            # Sent as the model wrote it (a fragment per token or so), not cut up at the
            # end. (A swarm's answer comes whole from the agent it chose.)
            self.assertGreaterEqual(calls[0].get("fragments", 0), 4, calls[0])

    def test_a_call_starts_streaming_before_the_answer_ends(self):
        # The call's name arrives in a chunk of its own, before its arguments are whole.
        stream = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=100,
            stream=True,
        )
        seen = []
        for chunk in stream:
            if not chunk.choices:
                continue
            for tc in chunk.choices[0].delta.tool_calls or []:
                seen.append((tc.function.name, tc.function.arguments or ""))
        self.assertTrue(seen, "no call was streamed")
        self.assertEqual(seen[0][0], "get_weather")
        self.assertFalse(seen[0][1].strip().endswith("}"), seen)

    @unittest.skipUnless(TWO_CALLS, "set SHOAL_TWO_CALLS for a model that makes two calls here")
    def test_two_calls_in_one_answer(self):
        # At temperature 0 Qwen2.5-Coder-1.5B answers this with two calls (the 0.5B with
        # one); each becomes a call of its own, with its own id and index.
        chat = [
            {"role": "system", "content": "Call every tool the question needs, all in one "
             "answer, each call in its own <tool_call></tool_call> block."},
            {"role": "user", "content": "I need two things: the weather in Paris, and the "
             "local time in Paris."},
        ]
        ask = dict(model=MODEL, messages=chat, tools=[WEATHER, TIME], temperature=0, max_tokens=150)
        whole = client.chat.completions.create(**ask)
        choice = whole.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls", choice.message)
        calls = choice.message.tool_calls
        self.assertEqual([c.function.name for c in calls], ["get_weather", "get_time"], calls)
        for call, name in zip(calls, ["get_weather", "get_time"]):
            self.assertIn("paris", check_call(self, call, name)["city"].lower())
        self.assertNotEqual(calls[0].id, calls[1].id)

        streamed, finish = streamed_calls(**ask)
        self.assertEqual(finish, "tool_calls")
        self.assertEqual(sorted(streamed), [0, 1])
        for i, call in enumerate(calls):
            self.assertEqual(streamed[i]["name"], call.function.name)
            self.assertEqual(json.loads(streamed[i]["arguments"]), json.loads(call.function.arguments))
        self.assertNotEqual(streamed[0]["id"], streamed[1]["id"])

        single = client.chat.completions.create(**ask, parallel_tool_calls=False)
        one = single.choices[0]
        self.assertEqual(one.finish_reason, "tool_calls")
        self.assertEqual([c.function.name for c in one.message.tool_calls], ["get_weather"])
        # The answer ends with its one call: the second is not generated to be dropped.
        self.assertLess(single.usage.completion_tokens, whole.usage.completion_tokens, single.usage)

    def test_the_tool_result_is_answered(self):
        # The simplest tool: with a choice of units the 0.5B model asks again and again.
        simple = {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the current weather in a given city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
        first = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[simple], temperature=0, max_tokens=100
        )
        call = first.choices[0].message.tool_calls[0]
        history = QUESTION + [
            first.choices[0].message.model_dump(exclude_none=True),
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": json.dumps({"city": "Paris", "temperature_c": 17, "sky": "rain"}),
            },
        ]
        r = client.chat.completions.create(
            model=MODEL, messages=history, tools=[simple], temperature=0, max_tokens=80
        )
        answer = r.choices[0].message.content or ""
        # The result reached the model: its answer uses it. (Qwen2.5-Coder-0.5B also
        # repeats its call before it, which comes back as a call with the rest as content,
        # as llama-server reads it; the 1.5B answers in words — the opencode test.)
        self.assertTrue("17" in answer or "rain" in answer.lower(), r.choices[0].message)
        self.assertIn(r.choices[0].finish_reason, ("stop", "tool_calls"))

    def test_required_and_named_choices_force_a_call(self):
        chat = [{"role": "user", "content": "Hello! How are you today?"}]
        r = client.chat.completions.create(
            model=MODEL, messages=chat, tools=[WEATHER, TIME], tool_choice="required",
            temperature=0, max_tokens=100,
        )
        self.assertEqual(r.choices[0].finish_reason, "tool_calls")
        call = r.choices[0].message.tool_calls[0]
        self.assertIn(call.function.name, ("get_weather", "get_time"))
        json.loads(call.function.arguments)
        r = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=0, max_tokens=100,
        )
        check_call(self, r.choices[0].message.tool_calls[0], name="get_time")

    def test_tool_choice_none_answers_in_words(self):
        r = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="none",
            temperature=0, max_tokens=30,
        )
        self.assertFalse(r.choices[0].message.tool_calls)
        self.assertTrue(r.choices[0].message.content)


class JsonOutput(unittest.TestCase):
    SCHEMA = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "language": {"type": "string", "enum": ["python", "rust", "go"]},
            "lines": {"type": "integer"},
            "tested": {"type": "boolean"},
        },
        "required": ["name", "language", "lines", "tested"],
        "additionalProperties": False,
    }

    def test_json_schema_output_parses_for_every_seed(self):
        # The schema bounds every string and number, and the grammar every run of
        # whitespace, so the longest answer it allows fits in max_tokens: every answer
        # must end on its own and parse.
        prompt = [{"role": "user", "content": "Describe a small program you could write."}]
        for seed in range(SEEDS):
            r = client.chat.completions.create(
                model=MODEL, messages=prompt, temperature=1.0, seed=seed, max_tokens=600,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "program", "strict": True, "schema": self.SCHEMA},
                },
            )
            text = r.choices[0].message.content
            self.assertEqual(r.choices[0].finish_reason, "stop", f"seed {seed}: {text}")
            value = json.loads(text)
            self.assertEqual(set(value), set(self.SCHEMA["properties"]), text)
            self.assertIn(value["language"], ("python", "rust", "go"))
            self.assertIsInstance(value["lines"], int)
            self.assertIsInstance(value["tested"], bool)
            self.assertLessEqual(len(value["name"]), 40)

    def test_json_object_mode(self):
        r = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=80, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        )
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertIsInstance(json.loads(r.choices[0].message.content), dict)

    def test_a_32000_token_max_tokens_is_clamped(self):
        r = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=32000,
            messages=[{"role": "user", "content": "Say hello."}],
        )
        self.assertEqual(r.choices[0].finish_reason, "stop")


if __name__ == "__main__":
    unittest.main(verbosity=2)
