#!/usr/bin/env python3
"""A running Shoal node seen through the official `anthropic` Python package: a whole and a
streamed Messages answer, a tool use (the model's call, then its answer to the result),
errors in Anthropic's shape. Meant for a model whose chat template renders tools
(Qwen2.5-Coder).

Usage: SHOAL_ROOT_URL=http://127.0.0.1:PORT python3 tests/python/test_anthropic_client.py

Env:
  SHOAL_ROOT_URL  the server's address, without /v1 (required)
  SHOAL_API_KEY   the key to send as x-api-key (default "sk-test"; any works without a key)

The `anthropic` package is required (`pip install anthropic`).
"""

import json
import os
import sys
import unittest

try:
    import anthropic
except ImportError:
    sys.stderr.write("FAILED: the `anthropic` Python package is not installed (pip install anthropic)\n")
    sys.exit(1)

ROOT_URL = os.environ.get("SHOAL_ROOT_URL", "").rstrip("/")
if not ROOT_URL:
    sys.stderr.write("FAILED: set SHOAL_ROOT_URL, e.g. http://127.0.0.1:8080\n")
    sys.exit(1)

client = anthropic.Anthropic(
    base_url=ROOT_URL, api_key=os.environ.get("SHOAL_API_KEY", "sk-test"), max_retries=0, timeout=600
)
# Clients are often set up with a Claude model name: any name is served by the node's model.
MODEL = "claude-sonnet-4-5"
# This SDK version has no sampling arguments (newer Claude models take none); the Messages
# API's `temperature` still goes in the body, and greedy answers can be compared.
GREEDY = {"temperature": 0}

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a given city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


class Messages(unittest.TestCase):
    def test_a_whole_answer(self):
        m = client.messages.create(
            model=MODEL, max_tokens=40, extra_body=GREEDY,
            system="You answer in one short sentence.",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        self.assertEqual(m.type, "message")
        self.assertEqual(m.role, "assistant")
        self.assertTrue(m.id.startswith("msg_"))
        self.assertIn(m.stop_reason, ("end_turn", "max_tokens"))
        self.assertEqual(m.content[0].type, "text")
        self.assertIn("Paris", m.content[0].text)
        self.assertGreater(m.usage.input_tokens, 5)
        self.assertGreater(m.usage.output_tokens, 0)

    def test_a_streamed_answer_is_the_whole_answer(self):
        args = dict(
            model=MODEL, max_tokens=30, extra_body=GREEDY,
            messages=[{"role": "user", "content": "Count from 1 to 5."}],
        )
        whole = client.messages.create(**args)
        with client.messages.stream(**args) as stream:
            pieces = list(stream.text_stream)
            final = stream.get_final_message()
        self.assertGreater(len(pieces), 1)
        self.assertEqual("".join(pieces), whole.content[0].text)
        self.assertEqual(final.content[0].text, whole.content[0].text)
        self.assertEqual(final.stop_reason, whole.stop_reason)
        self.assertEqual(final.usage.output_tokens, whole.usage.output_tokens)

    def test_max_tokens_is_reported(self):
        m = client.messages.create(
            model=MODEL, max_tokens=3, extra_body=GREEDY,
            messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        )
        self.assertEqual(m.stop_reason, "max_tokens")
        self.assertEqual(m.usage.output_tokens, 3)


    def test_a_stop_sequence_is_named(self):
        args = dict(
            model=MODEL, max_tokens=30, extra_body=GREEDY,
            messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        )
        text = client.messages.create(**args).content[0].text
        words = text.split()
        self.assertGreater(len(words), 3, text)
        stop = words[2]
        m = client.messages.create(stop_sequences=["never-said", stop], **args)
        self.assertEqual(m.stop_reason, "stop_sequence")
        self.assertEqual(m.stop_sequence, stop)
        self.assertEqual(m.content[0].text, text[: text.index(stop)])
        with client.messages.stream(stop_sequences=["never-said", stop], **args) as stream:
            final = stream.get_final_message()
        self.assertEqual(final.stop_reason, "stop_sequence")
        self.assertEqual(final.stop_sequence, stop)
        self.assertEqual(final.content[0].text, m.content[0].text)
        # Without one, there is none.
        self.assertIsNone(client.messages.create(**args).stop_sequence)


class CountTokens(unittest.TestCase):
    def test_the_count_is_the_answers_input_tokens(self):
        args = dict(
            model=MODEL, system="You answer in one short sentence.",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        counted = client.messages.count_tokens(**args)
        m = client.messages.create(max_tokens=4, extra_body=GREEDY, **args)
        # What the answer read from the prompt cache counts apart, as Anthropic's does.
        read = m.usage.cache_read_input_tokens or 0
        self.assertEqual(counted.input_tokens, m.usage.input_tokens + read)
        # Tools are part of the prompt.
        with_tools = client.messages.count_tokens(tools=[WEATHER], **args)
        self.assertGreater(with_tools.input_tokens, counted.input_tokens)


class ToolUse(unittest.TestCase):
    def test_a_tool_use_and_its_result(self):
        m = client.messages.create(
            model=MODEL, max_tokens=100, extra_body=GREEDY, tools=[WEATHER], messages=QUESTION
        )
        self.assertEqual(m.stop_reason, "tool_use", m.content)
        uses = [b for b in m.content if b.type == "tool_use"]
        self.assertEqual(len(uses), 1)
        use = uses[0]
        self.assertTrue(use.id.startswith("toolu_"))
        self.assertEqual(use.name, "get_weather")
        self.assertIn("paris", use.input["city"].lower())

        history = QUESTION + [
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {"role": "user", "content": [{
                "type": "tool_result", "tool_use_id": use.id,
                "content": json.dumps({"city": "Paris", "temperature_c": 17, "sky": "rain"}),
            }]},
        ]
        r = client.messages.create(
            model=MODEL, max_tokens=80, extra_body=GREEDY, tools=[WEATHER], messages=history
        )
        # The result reached the model: its answer uses it. (Qwen2.5-Coder-0.5B repeats
        # its call before it; see test_agent_api.py.)
        self.assertIn(r.stop_reason, ("end_turn", "tool_use"))
        text = "".join(b.text for b in r.content if b.type == "text")
        self.assertTrue("17" in text or "rain" in text.lower(), r.content)

    def test_a_streamed_tool_use(self):
        with client.messages.stream(
            model=MODEL, max_tokens=100, extra_body=GREEDY, tools=[WEATHER], messages=QUESTION,
            tool_choice={"type": "tool", "name": "get_weather"},
        ) as stream:
            partials = [e.delta.partial_json for e in stream
                        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
            final = stream.get_final_message()
        # The input streamed as it was written, a token or so at a time.
        self.assertGreaterEqual(len(partials), 4, partials)
        self.assertEqual(final.stop_reason, "tool_use")
        use = [b for b in final.content if b.type == "tool_use"][0]
        self.assertEqual(use.name, "get_weather")
        self.assertIsInstance(use.input["city"], str)


class Errors(unittest.TestCase):
    def test_a_bad_request_is_anthropic_shaped(self):
        with self.assertRaises(anthropic.BadRequestError) as caught:
            client.messages.create(
                model=MODEL, max_tokens=10,
                messages=[{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
                ]}],
            )
        body = caught.exception.body
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "invalid_request_error")

    def test_a_prompt_too_long_is_said_as_anthropic_says_it(self):
        # Claude Code compacts its history when it reads these words.
        with self.assertRaises(anthropic.BadRequestError) as caught:
            client.messages.create(
                model=MODEL, max_tokens=10,
                messages=[{"role": "user", "content": "hello " * 40000}],
            )
        error = caught.exception.body["error"]
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertTrue(error["message"].startswith("prompt is too long: "), error["message"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
