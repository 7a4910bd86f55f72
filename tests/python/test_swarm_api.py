#!/usr/bin/env python3
"""What coding agents need, asked of a swarm head through the official `openai` client:
tool calls, JSON answers, log-probabilities and `n` go through the swarm as whole requests
(each agent answers with its own chat API; the head chooses one agent's answer as it
chooses among texts). tests/python/test_agent_api.py runs against the same head too.

Usage: SHOAL_BASE_URL=http://127.0.0.1:PORT/v1 python3 tests/python/test_swarm_api.py

Env:
  SHOAL_BASE_URL  the head's OpenAI base URL, ending in /v1 (required); the head and its
                  agents run the same model, whose chat template renders tools
                  (Qwen2.5-Coder)

The `openai`, `anthropic` and `ollama` packages are required (`pip install openai anthropic
ollama`): the swarm answers `swarm` models on the Anthropic and Ollama APIs too.
"""

import json
import os
import sys
import unittest
import urllib.request

try:
    import anthropic
    import ollama
    import openai
except ImportError as e:
    sys.stderr.write(f"FAILED: {e} (pip install openai anthropic ollama)\n")
    sys.exit(1)

BASE_URL = os.environ.get("SHOAL_BASE_URL", "").rstrip("/")
if not BASE_URL:
    sys.stderr.write("FAILED: set SHOAL_BASE_URL, e.g. http://127.0.0.1:8080/v1\n")
    sys.exit(1)

client = openai.OpenAI(base_url=BASE_URL, api_key="sk-test", max_retries=0, timeout=600)
# The head's own model: the same as its agents'.
OWN_MODEL = client.models.list().data[0].id

WEATHER = {
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
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
FORCED = {"type": "function", "function": {"name": "get_weather"}}


def swarm_of(response):
    swarm = response.model_extra.get("swarm")
    assert swarm is not None, f"a swarm answer says what the swarm did: {response}"
    return swarm


def call_of(test, message):
    test.assertEqual(len(message.tool_calls), 1, message)
    call = message.tool_calls[0]
    test.assertEqual(call.type, "function")
    test.assertTrue(call.id.startswith("call_"), call.id)
    test.assertEqual(call.function.name, "get_weather")
    args = json.loads(call.function.arguments)
    test.assertIsInstance(args["city"], str)
    return args


class ToolCallsThroughTheSwarm(unittest.TestCase):
    def test_a_vote_chooses_one_agents_tool_call(self):
        r = client.chat.completions.create(
            model="swarm:vote", messages=QUESTION, tools=[WEATHER], tool_choice=FORCED,
            temperature=0, max_tokens=60,
        )
        self.assertEqual(r.model, "swarm:vote")
        self.assertEqual(r.choices[0].finish_reason, "tool_calls")
        args = call_of(self, r.choices[0].message)
        self.assertIn("paris", args["city"].lower())
        swarm = swarm_of(r)
        self.assertIn("vote", swarm["decided_by"])
        self.assertGreaterEqual(len(swarm["agents_responded"]), 1, swarm)

    def test_a_streamed_swarm_call_streams_like_a_model(self):
        stream = client.chat.completions.create(
            model="swarm:vote", messages=QUESTION, tools=[WEATHER], tool_choice=FORCED,
            temperature=0, max_tokens=60, stream=True, stream_options={"include_usage": True},
        )
        calls, finish, ids, usage = {}, None, set(), None
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage:
                usage = chunk.usage
            if not chunk.choices:
                continue
            for tc in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        self.assertEqual(finish, "tool_calls")
        self.assertEqual(len(ids), 1, "every chunk of one answer has its id")
        self.assertEqual(list(calls), [0])
        self.assertEqual(calls[0]["name"], "get_weather")
        self.assertTrue(calls[0]["id"].startswith("call_"))
        self.assertIn("paris", json.loads(calls[0]["arguments"])["city"].lower())
        self.assertIsNotNone(usage, "the usage chunk comes when asked for")
        self.assertGreater(usage.completion_tokens, 0)

    def test_the_strongest_agent_answers_as_the_model_itself_does(self):
        # Greedy, same model, same template: the swarm's answer is the model's own.
        own = client.chat.completions.create(
            model=OWN_MODEL, messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=60,
        )
        swarm = client.chat.completions.create(
            model="swarm:strongest", messages=QUESTION, tools=[WEATHER], temperature=0,
            max_tokens=60,
        )
        self.assertEqual(swarm.choices[0].finish_reason, own.choices[0].finish_reason)
        self.assertEqual(swarm.choices[0].message.content, own.choices[0].message.content)
        self.assertEqual(
            [(c.function.name, json.loads(c.function.arguments))
             for c in swarm.choices[0].message.tool_calls or []],
            [(c.function.name, json.loads(c.function.arguments))
             for c in own.choices[0].message.tool_calls or []],
        )

    def test_a_bad_tool_choice_is_the_clients_400(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="swarm", messages=QUESTION, tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "no_such_tool"}},
                max_tokens=20,
            )
        self.assertIn("no_such_tool", str(caught.exception))


class JsonAndAlternativesThroughTheSwarm(unittest.TestCase):
    SCHEMA = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }

    def test_moa_chooses_a_json_answer_it_cannot_merge(self):
        r = client.chat.completions.create(
            model="swarm:moa", temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": "Name a large city and its country."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "place", "strict": True, "schema": self.SCHEMA},
            },
        )
        value = json.loads(r.choices[0].message.content)
        self.assertEqual(set(value), {"city", "country"})
        self.assertIn("moa cannot merge", swarm_of(r)["decided_by"])

    def test_n_answers_with_log_probabilities(self):
        r = client.chat.completions.create(
            model="swarm:strongest", temperature=0.8, seed=3, max_tokens=12, n=2,
            logprobs=True, top_logprobs=2,
            messages=[{"role": "user", "content": "Say a colour."}],
        )
        self.assertEqual([c.index for c in r.choices], [0, 1])
        for choice in r.choices:
            tokens = choice.logprobs.content
            self.assertTrue(tokens, choice)
            self.assertEqual("".join(t.token for t in tokens), choice.message.content)
            self.assertTrue(all(t.logprob <= 0 for t in tokens))
            self.assertTrue(all(len(t.top_logprobs) == 2 for t in tokens))

    def test_the_swarm_query_endpoint_returns_the_chosen_response(self):
        body = json.dumps({
            "messages": QUESTION, "tools": [WEATHER], "tool_choice": "required",
            "max_tokens": 60, "temperature": 0, "strategy": "fastest",
        }).encode()
        root = BASE_URL[: -len("/v1")]
        request = urllib.request.Request(
            root + "/v1/swarm/query", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as reply:
            outcome = json.load(reply)
        message = outcome["response"]["choices"][0]["message"]
        self.assertEqual(message["tool_calls"][0]["function"]["name"], "get_weather")
        # The answer's plain summary, as the head compared it: the call as a line of JSON.
        self.assertEqual(json.loads(outcome["final_answer"])["name"], "get_weather")


class OtherApisAskTheSwarm(unittest.TestCase):
    """`swarm` and `swarm:STRATEGY` as model names on the Anthropic and Ollama APIs."""

    ROOT = BASE_URL[: -len("/v1")]
    WEATHER = {
        "name": "get_weather",
        "description": "Get the current weather in a given city.",
        "input_schema": WEATHER["function"]["parameters"],
    }

    def test_anthropic_messages_whole_streamed_and_a_tool_use(self):
        client = anthropic.Anthropic(base_url=self.ROOT, api_key="sk-test", max_retries=0,
                                     timeout=600)
        m = client.messages.create(
            model="swarm:strongest", max_tokens=30, extra_body={"temperature": 0},
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        self.assertEqual(m.model, "swarm:strongest")
        self.assertTrue(m.content[0].text.strip(), m)
        with client.messages.stream(
            model="swarm:vote", max_tokens=60, extra_body={"temperature": 0},
            tools=[self.WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
            messages=QUESTION,
        ) as stream:
            final = stream.get_final_message()
        self.assertEqual(final.stop_reason, "tool_use", final)
        use = [b for b in final.content if b.type == "tool_use"][0]
        self.assertEqual(use.name, "get_weather")
        self.assertIn("paris", use.input["city"].lower())

    def test_ollama_lists_and_chats_with_the_swarm(self):
        client = ollama.Client(host=self.ROOT, timeout=600)
        names = {m.model for m in client.list().models}
        self.assertTrue({"swarm:latest", "swarm:vote", "swarm:cluster"} <= names, names)
        r = client.chat(model="swarm", messages=[{"role": "user", "content": "Name a color."}],
                        options={"temperature": 0, "num_predict": 16})
        self.assertTrue(r.message.content.strip(), r)
        self.assertEqual(r.done_reason, "stop")
        parts = list(client.chat(
            model="swarm:strongest", messages=QUESTION, tools=[WEATHER], stream=True,
            options={"temperature": 0, "num_predict": 60},
        ))
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        self.assertTrue(parts[-1].done)
        self.assertEqual([c.function.name for c in calls], ["get_weather"], parts)
        self.assertIn("paris", calls[0].function.arguments["city"].lower())


if __name__ == "__main__":
    unittest.main(verbosity=2)
