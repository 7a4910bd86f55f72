#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The agent side and the head's client, end to end over loopback TCP with the real
//! SmolLM2-135M model: the card, greedy answers identical to the engine's own, a head that
//! leaves or times out freeing the agent, hostile peers, and refused requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use shoal_engine::{ChatMessage, FinishReason, GenerateParams, Model, SamplingParams};
use shoal_swarm::agent::{
    ask, describe, measure_decode_speed, AgentConfig, AgentError, AgentService, ApiRefusal, Caller,
    ChatApi,
};
use shoal_wire::{
    client_handshake, server_handshake, Ask, Capabilities, ChatTurn, Connection, Describe,
    EndSession, ErrorCode, Finish, Hello, HelloAck, Limits, Message, Ping, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";
/// Generous: the tests of this file run in parallel on a small shared CPU.
const LONG: Duration = Duration::from_secs(120);
const HEAD: &str = "test-head";

/// The head, as the agent client sees it: no swarm key.
fn head() -> Caller {
    Caller {
        node_id: HEAD.into(),
        transport: Transport::default(),
    }
}
const SYSTEM: &str = "You are a concise assistant.";
/// A prompt SmolLM2 answers at length (it runs past 400 tokens greedily), so that a
/// generation is surely still running when the test pulls the plug.
const STORY: &str = "Write a very long story about a dragon, with many chapters.";

fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")))
}

/// The model, loaded once for every test of this file.
fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = models_dir().join(SMOLLM2);
            assert!(
                path.is_file(),
                "model {} is missing: run scripts/fetch-models.sh",
                path.display()
            );
            Arc::new(Model::load(&path, |_, _| {}).expect("the model loads"))
        })
        .clone()
}

struct Agent {
    service: Arc<AgentService>,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(config: AgentConfig) -> Agent {
    let service = Arc::new(AgentService::new(model(), config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(Arc::clone(&service).serve(listener, async move {
        let _ = stopped.await;
    }));
    Agent {
        service,
        addr,
        _stop: stop,
    }
}

fn config() -> AgentConfig {
    AgentConfig {
        role: "concise".into(),
        system_prompt: Some(SYSTEM.into()),
        ..AgentConfig::new("agent-1", SMOLLM2)
    }
}

fn user_ask(request_id: u64, content: &str, max_tokens: u32) -> Ask {
    Ask {
        request_id,
        system: None,
        messages: vec![ChatTurn {
            role: "user".into(),
            content: content.into(),
        }],
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop: Vec::new(),
        choices: Vec::new(),
        request: None,
    }
}

/// A connection that has passed the handshake, for tests that drive the protocol by hand.
async fn dial(addr: SocketAddr) -> Connection {
    let mut conn = Connection::connect(addr, Limits::default()).await.unwrap();
    let ack = client_handshake(
        &mut conn,
        Hello {
            node_id: HEAD.into(),
            software_version: "0.1.0".into(),
            capabilities: Capabilities::HEAD,
        },
    )
    .await
    .unwrap();
    assert!(ack.capabilities.contains(Capabilities::AGENT));
    assert_eq!(ack.node_id, "agent-1");
    conn
}

/// Waits until `cond` holds, for at most `limit`; returns how long it took.
async fn wait_for(limit: Duration, what: &str, cond: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// What the engine itself generates greedily for this conversation.
fn reference(chat: &[ChatMessage], max_tokens: usize) -> (String, usize, usize, FinishReason) {
    let m = model();
    let prompt = m.encode_prompt(&m.render_chat(chat).unwrap()).unwrap();
    let prompt_len = prompt.len();
    let params = GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: Vec::new(),
        cache_prompt: true,
    };
    let mut generation = m.generate(prompt, params).unwrap();
    while generation.next_step().unwrap().is_some() {}
    (
        generation.text().to_owned(),
        prompt_len,
        generation.generated().len(),
        generation.finish_reason().unwrap(),
    )
}

fn chat(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

#[tokio::test]
async fn choices_limit_the_answer_to_one_of_them() {
    let agent = start(config()).await;
    let question = "Is the sky green? Answer yes or no.";
    let choices: Vec<String> = vec!["Maybe".into(), "Perhaps not".into()];
    // Free, the model answers in its own words...
    let free = ask(agent.addr, &head(), user_ask(1, question, 16), LONG)
        .await
        .unwrap();
    assert!(!choices.contains(&free.text), "{:?}", free.text);
    // ...constrained, with one of the choices, exactly what the engine gives.
    let answer = ask(
        agent.addr,
        &head(),
        Ask {
            choices: choices.clone(),
            ..user_ask(2, question, 16)
        },
        LONG,
    )
    .await
    .unwrap();
    assert!(choices.contains(&answer.text), "{:?}", answer.text);
    assert_eq!(answer.finish, Finish::Stop);
    let m = model();
    let chat = [chat("system", SYSTEM), chat("user", question)];
    let prompt = m.encode_prompt(&m.render_chat(&chat).unwrap()).unwrap();
    let params = GenerateParams {
        max_tokens: 16,
        ..GenerateParams::default()
    };
    let mut generation = m.generate(prompt, params).unwrap();
    generation.constrain_to(&choices).unwrap();
    while generation.next_step().unwrap().is_some() {}
    assert_eq!(answer.text, generation.text());
    assert_eq!(
        answer.completion_tokens as usize,
        generation.generated().len()
    );
}

#[tokio::test]
async fn describe_returns_the_card() {
    let agent = start(AgentConfig {
        role: "critic".into(),
        tokens_per_s: 42.5,
        thermal_penalty: 0.75,
        ..config()
    })
    .await;
    let card = describe(agent.addr, &head(), LONG).await.unwrap();
    let m = model();
    assert_eq!(card.node_id, "agent-1");
    assert_eq!(card.role, "critic");
    assert_eq!(card.model_id, SMOLLM2);
    assert_eq!(card.model_name, m.name());
    assert_eq!(card.context_length as usize, m.config().context_length);
    assert_eq!(card.tokens_per_s, 42.5);
    assert_eq!(card.thermal_penalty, 0.75);
    assert_eq!(card.busy, 0);

    // Updates show in the next card; values the wire refuses are clamped.
    agent.service.set_tokens_per_s(f32::NAN);
    agent.service.set_thermal_penalty(3.0);
    let card = describe(agent.addr, &head(), LONG).await.unwrap();
    assert_eq!(card.tokens_per_s, 0.0);
    assert_eq!(card.thermal_penalty, 1.0);
}

#[tokio::test]
async fn greedy_answers_are_the_engines_own() {
    let agent = start(config()).await;
    let question = "What is the capital of France?";

    // The agent's role prompt, then the question.
    let answer = ask(agent.addr, &head(), user_ask(1, question, 24), LONG)
        .await
        .unwrap();
    let (text, prompt_tokens, completion_tokens, finish) =
        reference(&[chat("system", SYSTEM), chat("user", question)], 24);
    assert!(!text.is_empty());
    assert_eq!(answer.request_id, 1);
    assert_eq!(answer.text, text);
    assert_eq!(answer.prompt_tokens as usize, prompt_tokens);
    assert_eq!(answer.completion_tokens as usize, completion_tokens);
    assert_eq!(
        answer.finish,
        match finish {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
        }
    );

    // `Some("")` drops the role prompt; the model's template then adds its own default.
    let answer = ask(
        agent.addr,
        &head(),
        Ask {
            system: Some(String::new()),
            ..user_ask(2, question, 16)
        },
        LONG,
    )
    .await
    .unwrap();
    let (text, prompt_tokens, ..) = reference(&[chat("user", question)], 16);
    assert_eq!(answer.text, text);
    assert_eq!(answer.prompt_tokens as usize, prompt_tokens);

    // Another system prompt replaces the role's.
    let other = "You answer in French.";
    let answer = ask(
        agent.addr,
        &head(),
        Ask {
            system: Some(other.into()),
            ..user_ask(3, question, 16)
        },
        LONG,
    )
    .await
    .unwrap();
    let (text, ..) = reference(&[chat("system", other), chat("user", question)], 16);
    assert_eq!(answer.text, text);
    assert_eq!(agent.service.busy(), 0);
}

/// Asks that arrive together run together (their decode steps share the model's passes),
/// and each answer is still exactly the engine's own for its conversation alone: different
/// prompts, lengths and system prompts, one joining while the others run.
#[tokio::test]
async fn answers_made_together_are_each_the_engines_own() {
    let agent = start(config()).await;
    let questions = [
        ("What is the capital of France?", 24, None),
        ("Name a prime number.", 12, Some("")),
        (
            "Write a haiku about the sea.",
            40,
            Some("You answer in French."),
        ),
        ("What is two plus two?", 8, None),
    ];
    let asks = questions
        .iter()
        .enumerate()
        .map(|(i, &(question, max_tokens, system))| {
            let addr = agent.addr;
            async move {
                // The last joins while the others are half way.
                if i == 3 {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                let ask = Ask {
                    system: system.map(str::to_owned),
                    ..user_ask(i as u64 + 1, question, max_tokens)
                };
                ask_agent(addr, ask).await
            }
        });
    let answers = futures::future::join_all(asks).await;
    for (answer, &(question, max_tokens, system)) in answers.iter().zip(&questions) {
        let mut conversation = Vec::new();
        match system {
            None => conversation.push(chat("system", SYSTEM)),
            Some("") => {}
            Some(other) => conversation.push(chat("system", other)),
        }
        conversation.push(chat("user", question));
        let (text, prompt_tokens, completion_tokens, _) =
            reference(&conversation, max_tokens as usize);
        assert_eq!(answer.text, text, "{question}");
        assert_eq!(answer.prompt_tokens as usize, prompt_tokens, "{question}");
        assert_eq!(
            answer.completion_tokens as usize, completion_tokens,
            "{question}"
        );
    }
    assert_eq!(agent.service.busy(), 0);
    assert!(
        agent.service.largest_pass() >= 2,
        "the answers never shared a pass"
    );
}

async fn ask_agent(addr: SocketAddr, ask_: Ask) -> shoal_wire::Answer {
    ask(addr, &head(), ask_, LONG).await.unwrap()
}

/// Issue #14: the peer port closes connections silent between requests for its idle
/// timeout, but a head waiting in silence for a long answer is not one of them.
#[tokio::test]
async fn an_answer_longer_than_the_idle_timeout_still_comes_back() {
    let mut config = config();
    config.transport.idle_timeout = Duration::from_millis(300);
    let agent = start(config).await;
    let mut conn = dial(agent.addr).await;
    let started = Instant::now();
    conn.write_frame(&Message::Ask(user_ask(1, STORY, 256)))
        .await
        .unwrap();
    let reply = tokio::time::timeout(LONG, conn.read_frame()).await.unwrap();
    let Ok(Some(Message::Answer(answer))) = reply else {
        panic!("no answer: {reply:?}");
    };
    assert!(
        started.elapsed() > Duration::from_millis(600),
        "the answer came too fast to show anything ({:?})",
        started.elapsed()
    );
    assert_eq!(answer.completion_tokens, 256);
    // Silent after it: closed.
    let after = tokio::time::timeout(LONG, conn.read_frame()).await.unwrap();
    assert!(matches!(after, Ok(None) | Err(_)), "{after:?}");
}

#[tokio::test]
async fn a_dropped_connection_frees_the_agent() {
    let agent = start(config()).await;
    let mut conn = dial(agent.addr).await;
    conn.write_frame(&Message::Ask(user_ask(7, STORY, 4000)))
        .await
        .unwrap();
    // Wait until it runs, and let it decode for a while.
    let service = Arc::clone(&agent.service);
    wait_for(LONG, "the Ask to start", || service.busy() == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let card = describe(agent.addr, &head(), LONG).await.unwrap();
    assert_eq!(card.busy, 1, "the long generation is still running");

    drop(conn);
    let freed = wait_for(Duration::from_secs(10), "the agent to be free", || {
        service.busy() == 0
    })
    .await;
    // A 4000-token story takes a minute; a stop is one decode step.
    assert!(freed < Duration::from_secs(10), "{freed:?}");

    let started = Instant::now();
    let answer = ask(agent.addr, &head(), user_ask(8, "Say hi.", 4), LONG)
        .await
        .unwrap();
    assert_eq!(answer.request_id, 8);
    assert!(answer.completion_tokens <= 4);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(describe(agent.addr, &head(), LONG).await.unwrap().busy, 0);
}

#[tokio::test]
async fn a_head_that_leaves_during_a_long_prefill_stops_it() {
    let agent = start(config()).await;
    // About 3000 prompt tokens: six prefill chunks, tens of seconds of work on a small CPU.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(300);
    let mut conn = dial(agent.addr).await;
    conn.write_frame(&Message::Ask(user_ask(14, &long, 8)))
        .await
        .unwrap();
    let service = Arc::clone(&agent.service);
    wait_for(LONG, "the Ask to start", || service.busy() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(service.busy(), 1);
    drop(conn);
    // The prefill stops at the next chunk boundary instead of running to the end.
    let freed = wait_for(LONG, "the agent to be free", || service.busy() == 0).await;
    assert!(freed < Duration::from_secs(12), "{freed:?}");
}

#[tokio::test]
async fn a_client_timeout_is_reported_and_abandons_the_work() {
    let agent = start(config()).await;
    let err = ask(
        agent.addr,
        &head(),
        user_ask(9, STORY, 4000),
        Duration::from_millis(400),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, AgentError::Timeout { what: "Ask", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("did not answer Ask within 400 ms"));
    // The timeout dropped the connection, which stops the generation.
    let service = Arc::clone(&agent.service);
    wait_for(Duration::from_secs(20), "the agent to be free", || {
        service.busy() == 0
    })
    .await;
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let agent = start(config()).await;

    // Not a shoal peer at all.
    let mut raw = TcpStream::connect(agent.addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut reply))
        .await
        .expect("the agent closes the connection")
        .unwrap();
    let (msg, _) = shoal_wire::decode_frame(&reply, &Limits::default())
        .unwrap()
        .expect("the agent says why before closing");
    let Message::Error(e) = msg else {
        panic!("not an Error: {msg:?}")
    };
    assert_eq!(e.code, ErrorCode::MALFORMED);
    assert!(e.message.contains("not a Shoal peer"), "{}", e.message);

    // A shoal peer sending a message agents do not take.
    let mut conn = dial(agent.addr).await;
    conn.write_frame(&Message::EndSession(EndSession::free(1)))
        .await
        .unwrap();
    let Some(Message::Error(e)) = conn.read_frame().await.unwrap() else {
        panic!("no Error frame")
    };
    assert!(e.message.contains("EndSession"), "{}", e.message);
    assert_eq!(conn.read_frame().await.unwrap(), None, "closed");

    // Garbage after the handshake, on a connection while another one is used normally.
    let mut good = dial(agent.addr).await;
    let mut bad = TcpStream::connect(agent.addr).await.unwrap();
    let hello = Message::Hello(Hello {
        node_id: "rogue".into(),
        software_version: "0.1.0".into(),
        capabilities: Capabilities::HEAD,
    });
    bad.write_all(&hello.to_frame().unwrap()).await.unwrap();
    bad.write_all(&[0xFF; 64]).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), bad.read_to_end(&mut sink))
        .await
        .expect("the agent closes the rogue connection")
        .unwrap();

    good.write_frame(&Message::Ping(Ping { nonce: 5 }))
        .await
        .unwrap();
    assert!(matches!(
        good.read_frame().await.unwrap(),
        Some(Message::Pong(p)) if p.nonce == 5
    ));
    good.write_frame(&Message::Describe(Describe))
        .await
        .unwrap();
    assert!(matches!(
        good.read_frame().await.unwrap(),
        Some(Message::AgentCard(_))
    ));
    let answer = ask(agent.addr, &head(), user_ask(10, "Say hi.", 4), LONG)
        .await
        .unwrap();
    assert_eq!(answer.request_id, 10);
}

#[tokio::test]
async fn a_prompt_beyond_the_context_is_refused_and_the_connection_stays() {
    let agent = start(config()).await;
    let too_long = "hello ".repeat(model().config().context_length + 100);

    let mut conn = dial(agent.addr).await;
    conn.write_frame(&Message::Ask(user_ask(11, &too_long, 8)))
        .await
        .unwrap();
    let Some(Message::Error(e)) = conn.read_frame().await.unwrap() else {
        panic!("no Error frame")
    };
    assert_eq!(e.code, ErrorCode::CONTEXT_LENGTH);
    assert_eq!(e.session_id, Some(11), "the error names the request");
    assert!(e.message.contains("context"), "{}", e.message);

    // Same connection, next request.
    conn.write_frame(&Message::Ask(user_ask(12, "Say hi.", 4)))
        .await
        .unwrap();
    let Some(Message::Answer(a)) = conn.read_frame().await.unwrap() else {
        panic!("no Answer")
    };
    assert_eq!(a.request_id, 12);
    conn.write_frame(&Message::Describe(Describe))
        .await
        .unwrap();
    let Some(Message::AgentCard(card)) = conn.read_frame().await.unwrap() else {
        panic!("no AgentCard")
    };
    assert_eq!(card.busy, 0);

    // Through the client: a remote error with the agent's words.
    let err = ask(agent.addr, &head(), user_ask(13, &too_long, 8), LONG)
        .await
        .unwrap_err();
    match &err {
        AgentError::Remote { code, message, .. } => {
            assert_eq!(*code, ErrorCode::CONTEXT_LENGTH);
            assert!(message.contains("context of"), "{message}");
        }
        other => panic!("not a remote error: {other}"),
    }
    assert!(err.refused_request() && err.context_length());
}

#[tokio::test]
async fn client_errors_say_what_to_check() {
    // Nothing listening.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = describe(addr, &head(), LONG).await.unwrap_err();
    assert!(matches!(err, AgentError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("cannot connect to agent"), "{err}");

    // A shoal node that is not an agent (a pipeline stage).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Connection::new(stream, Limits::default()).unwrap();
        server_handshake(&mut conn, |_| {
            Ok(HelloAck {
                node_id: "stage-1".into(),
                software_version: "0.1.0".into(),
                capabilities: Capabilities::STAGE,
                idle_timeout: None,
            })
        })
        .await
        .unwrap();
        let _ = conn.read_frame().await;
    });
    let err = describe(addr, &head(), LONG).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::NotAnAgent { node_id, .. } if node_id == "stage-1"),
        "{err}"
    );

    // An invalid Ask is refused before dialling.
    let bad = Ask {
        temperature: f32::NAN,
        ..user_ask(1, "hi", 1)
    };
    let err = ask(addr, &head(), bad, LONG).await.unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
}

/// A stand-in for the node's chat API (which lives in the API crate, above this one): it
/// records the requests it gets and answers a tool call, or refuses what asks for `"bad"`.
fn recording_chat_api(seen: Arc<std::sync::Mutex<Vec<String>>>) -> ChatApi {
    Arc::new(move |request: String| {
        let seen = Arc::clone(&seen);
        Box::pin(async move {
            seen.lock().unwrap().push(request.clone());
            if request.contains("bad") {
                return Err(ApiRefusal {
                    status: 400,
                    code: Some("invalid_value".into()),
                    message: "`tool_choice` names no tool".into(),
                });
            }
            if request.contains("long") {
                return Err(ApiRefusal {
                    status: 400,
                    code: Some("context_length_exceeded".into()),
                    message: "the prompt is longer than the context".into(),
                });
            }
            if request.contains("busy") {
                return Err(ApiRefusal {
                    status: 429,
                    code: Some("queue_full".into()),
                    message: "the queue is full".into(),
                });
            }
            Ok(
                r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,
                "tool_calls":[{"id":"call_1","type":"function","function":{"name":"f",
                "arguments":"{}"}}]},"finish_reason":"tool_calls"}],
                "usage":{"prompt_tokens":30,"completion_tokens":7,"total_tokens":37}}"#
                    .to_owned(),
            )
        })
    })
}

#[tokio::test]
async fn whole_api_requests_go_to_the_chat_api_and_need_one() {
    let whole = |request_id, request: &str| Ask {
        request: Some(request.to_owned()),
        ..user_ask(request_id, "weather?", 32)
    };

    // Without a chat API: refused, with the reason (the agent's set-up, not the request's
    // fault: not a refusal of the request).
    let agent = start(config()).await;
    let err = ask(agent.addr, &head(), whole(1, "{}"), LONG)
        .await
        .unwrap_err();
    assert!(!err.refused_request());
    match &err {
        AgentError::Remote { code, message, .. } => {
            assert_eq!(*code, ErrorCode::MODEL_UNAVAILABLE);
            assert!(message.contains("no whole API requests"), "{message}");
        }
        other => panic!("not a remote error: {other}"),
    }

    // With one: the request goes to it as sent, its response comes back whole, and the text
    // is the summary the head compares answers by.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let service =
        AgentService::new(model(), config()).with_chat_api(recording_chat_api(seen.clone()));
    let local = Arc::new(service);
    let request = r#"{"messages":[{"role":"user","content":"weather?"}],"tools":[]}"#;
    let answer = local.answer_here(whole(2, request)).await.unwrap();
    assert_eq!(seen.lock().unwrap().as_slice(), [request.to_owned()]);
    let response = answer.response.expect("the API's response");
    assert!(response.contains("call_1"), "{response}");
    let summary: serde_json::Value = serde_json::from_str(&answer.text).unwrap();
    assert_eq!(summary, serde_json::json!({"name": "f", "arguments": {}}));
    assert_eq!((answer.prompt_tokens, answer.completion_tokens), (30, 7));
    assert_eq!(answer.finish, Finish::Stop);
    assert_eq!(local.busy(), 0);

    // The API's refusal is the agent's, in its words.
    let err = local
        .answer_here(whole(3, r#"{"bad": true}"#))
        .await
        .unwrap_err();
    assert!(err.message.contains("names no tool"), "{err}");
    assert_eq!(err.code, ErrorCode::BAD_REQUEST);
    // Longer than the context, as the API's code says: the wire's own code for it.
    let err = local
        .answer_here(whole(5, r#"{"long": true}"#))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::CONTEXT_LENGTH, "{err}");
    // A full queue is the agent's state, not a refusal of the request.
    let err = local
        .answer_here(whole(4, r#"{"busy": true}"#))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::OVERLOADED, "{err}");
}

#[test]
fn decode_speed_is_measured() {
    let tps = measure_decode_speed(&model());
    assert!(tps.is_finite() && tps > 1.0, "{tps}");
}
