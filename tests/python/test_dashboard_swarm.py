"""The dashboard's swarm view in a real browser: Playwright (sync API) driving Chromium
against a swarm head with two agents.

Environment:
  SHOAL_ROOT_URL     the head's http://HOST:PORT
  SHOAL_API_KEY      the nodes' API key
  SHOAL_AGENTS       the agents' node ids, comma-separated
  SHOAL_SCREENSHOTS  a folder for dashboard-swarm.png (optional)
  SHOAL_CHROMIUM     the browser (default /usr/bin/chromium)

Checks: no console or page errors for the whole run; with the API key entered the Swarm
section lists every agent, healthy, with its role; the chat offers the swarm's models;
asking `swarm:vote` a question shows the final answer, every agent's answer with its agent,
role and task, the one chosen marked (its text is the final answer), and why it was chosen
(`decided_by`, a vote), and the swarm's summary (strategy, answers).

Run by crates/shoal/tests/dashboard_e2e.rs; by hand:
  SHOAL_ROOT_URL=http://127.0.0.1:8080 SHOAL_API_KEY=KEY SHOAL_AGENTS=agent-a,agent-b \\
      python3 tests/python/test_dashboard_swarm.py
"""

import os
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

ROOT = os.environ["SHOAL_ROOT_URL"].rstrip("/")
KEY = os.environ["SHOAL_API_KEY"]
AGENTS = [a for a in os.environ["SHOAL_AGENTS"].split(",") if a]
SHOTS = os.environ.get("SHOAL_SCREENSHOTS")
CHROMIUM = os.environ.get("SHOAL_CHROMIUM", "/usr/bin/chromium")
QUESTION = "What is the capital of France?"

started = time.monotonic()


def log(what):
    print(f"[dashboard-swarm {time.monotonic() - started:6.2f}s] {what}", flush=True)


def check(ok, message):
    if not ok:
        raise AssertionError(message)


def wait_until(page, predicate_js, arg, timeout_s, message):
    try:
        page.wait_for_function(predicate_js, arg=arg, timeout=timeout_s * 1000, polling=100)
    except Exception as e:  # Playwright's TimeoutError
        raise AssertionError(f"{message} (waited {timeout_s} s: {e.__class__.__name__})") from None


def run(page, console_errors, page_errors):
    page.goto(ROOT + "/")
    check(page.title().startswith("Shoal"), f"the page's title is {page.title()!r}")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")

    wait_until(
        page,
        "(n) => !document.getElementById('swarm-section').hidden && "
        "document.querySelectorAll('#swarm [data-agent] .pill[data-state=\"alive\"]').length === n",
        len(AGENTS),
        30,
        f"the Swarm section did not list {len(AGENTS)} healthy agents",
    )
    agents = page.evaluate(
        "() => [...document.querySelectorAll('#swarm [data-agent]')].map(r => "
        "({id: r.dataset.agent, cells: [...r.querySelectorAll('td')].map(c => c.innerText)}))"
    )
    log(f"agents: {agents}")
    check(sorted(a["id"] for a in agents) == sorted(AGENTS), f"the agents listed are {agents}")
    check(all(a["cells"][2] not in ("", "—") for a in agents), f"an agent shows no role: {agents}")

    # The swarm's models in the chat's model list; ask by vote.
    wait_until(
        page,
        "() => [...document.getElementById('chat-model').options].some(o => o.value === 'swarm:vote')",
        None,
        10,
        "the chat does not offer swarm:vote",
    )
    page.select_option("#chat-model", "swarm:vote")
    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-input", QUESTION)
    page.click("#chat-send")
    asked = time.monotonic()
    wait_until(
        page,
        "() => document.getElementById('swarm-report') !== null",
        None,
        120,
        "no swarm report appeared under the answer",
    )
    log(f"the swarm answered in {time.monotonic() - asked:.2f} s")
    report = page.evaluate(
        """() => {
            const r = document.getElementById('swarm-report');
            return {
                final: document.getElementById('chat-output')?.textContent ?? '',
                why: document.getElementById('swarm-why')?.innerText ?? '',
                summary: r.querySelector('.swarm-summary')?.innerText ?? '',
                answers: [...r.querySelectorAll('[data-agent-answer]')].map(a => ({
                    agent: a.dataset.agentAnswer, chosen: a.dataset.chosen === 'true',
                    failed: a.dataset.failed === 'true', task: a.dataset.task,
                    head: a.querySelector('summary')?.innerText ?? '',
                    text: a.querySelector('.body')?.textContent ?? '',
                })),
            };
        }"""
    )
    log(f"report: why={report['why']!r}; summary={report['summary']!r}; "
        f"answers={[(a['agent'], a['chosen'], a['text'][:30]) for a in report['answers']]}")
    answered = [a for a in report["answers"] if not a["failed"]]
    check(report["final"].strip(), "the final answer is empty")
    check("vote" in report["why"], f"the report does not say the answer was chosen by a vote: {report['why']!r}")
    check("strategy vote" in report["summary"].lower(), f"the summary does not name the strategy: {report['summary']!r}")
    check(len(answered) >= 2, f"the report shows fewer than two answers: {report['answers']}")
    check({a["agent"] for a in answered} <= set(AGENTS), f"answers from unknown agents: {report['answers']}")
    check(all(a["task"] == "sample" for a in answered), f"vote's answers are samples: {report['answers']}")
    chosen = [a for a in answered if a["chosen"]]
    check(chosen, f"no answer is marked chosen: {report['answers']}")
    check(all(a["text"].strip() == report["final"].strip() for a in chosen),
          "a chosen answer's text is not the final answer")
    check(page.locator("#swarm-report .tag.chosen").count() == len(chosen),
          "the chosen answers are not tagged as chosen")
    check(page.locator("#chat-status").get_attribute("data-state") == "done", "the chat did not end done")
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        path = os.path.join(SHOTS, "dashboard-swarm.png")
        page.locator("#swarm-report").scroll_into_view_if_needed()
        page.screenshot(path=path)
        log(f"screenshot {path}")

    page.wait_for_timeout(1000)
    check(not page_errors, f"the page threw: {page_errors}")
    check(not console_errors, f"the console showed errors: {console_errors}")


def main():
    console_errors = []
    page_errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: console_errors.append(f"{m.text} ({m.location.get('url', '')})") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            try:
                run(page, console_errors, page_errors)
            except BaseException:
                path = os.path.join(tempfile.gettempdir(), "shoal-dashboard-swarm-failure.png")
                try:
                    page.screenshot(path=path)
                    log(f"failed; the page then: {path}")
                except Exception:
                    pass
                log(f"console errors: {console_errors}; page errors: {page_errors}")
                raise
        finally:
            browser.close()
    log("dashboard swarm view: all checks passed")


if __name__ == "__main__":
    sys.exit(main())
