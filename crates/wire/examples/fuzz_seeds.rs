//! Writes one valid frame of every message type into a directory, as a seed corpus for the
//! `wire_decode` fuzz target (see docs/FUZZING.md):
//!
//! ```text
//! cargo run --release -p shoal-wire --example fuzz_seeds -- fuzz/corpus/wire_decode
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use shoal_wire::{
    Activations, AgentCard, Answer, Ask, Capabilities, Chaos, ChatTurn, DType, Describe,
    EndSession, ErrorCode, ErrorMessage, Finish, Forward, GetProfile, GetWeights, Heartbeat,
    HeldStage, Hello, HelloAck, KnownMember, LoadStage, LogitRows, Logits, Message, NodeInfo,
    Payload, Ping, Pong, Profile, Resume, SamplingSpec, StageReady, Token, Truncate, Verified,
    Want, WeightsChunk, WeightsManifest, WeightsRegion, WeightsWant,
};

fn seeds() -> Result<Vec<Message>, shoal_wire::WireError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 7070));
    let hidden = Activations::from_f32(2, 3, &[0.5, -1.0, 2.0, 0.0, 1e-3, 7.0], DType::F16)?;
    let logits = Activations::from_f32(1, 4, &[1.0, 2.0, 3.0, 4.0], DType::BF16)?;
    Ok(vec![
        Message::Hello(Hello {
            node_id: "node-a".into(),
            software_version: "0.1.0".into(),
            capabilities: Capabilities::STAGE | Capabilities::HEAD,
        }),
        Message::HelloAck(HelloAck {
            node_id: "node-b".into(),
            software_version: "0.1.0".into(),
            capabilities: Capabilities::STAGE,
            idle_timeout: Some(std::time::Duration::from_secs(120)),
        }),
        Message::Error(ErrorMessage::new(
            ErrorCode::UNKNOWN_SESSION,
            Some(3),
            "no such session",
        )),
        Message::Ping(Ping { nonce: 1 }),
        Message::Pong(Pong { nonce: 1 }),
        Message::LoadStage(LoadStage {
            plan_id: 1,
            model_id: "qwen2.5-0.5b".into(),
            model_sha256: [7; 32],
            layer_start: 0,
            layer_end: 12,
            embed: true,
            head: false,
            activation_dtype: DType::F16,
            max_context: 4096,
            next: Some(addr),
            weights_from: Vec::new(),
        }),
        // A stage told whom to ask for its layers (version 7: a list).
        Message::LoadStage(LoadStage {
            plan_id: 2,
            model_id: "qwen2.5-0.5b".into(),
            model_sha256: [7; 32],
            layer_start: 12,
            layer_end: 24,
            embed: false,
            head: true,
            activation_dtype: DType::F32,
            max_context: 4096,
            next: None,
            weights_from: vec![addr, "[::1]:7001".parse().unwrap_or(addr)],
        }),
        Message::GetWeights(GetWeights {
            model_id: "qwen2.5-0.5b".into(),
            model_sha256: [7; 32],
            layer_start: 12,
            layer_end: 24,
            embed: false,
            head: true,
        }),
        Message::WeightsWant(WeightsWant {
            regions: vec![0..1, 5..9],
        }),
        Message::WeightsManifest(WeightsManifest {
            file_len: 4096 + 1000,
            regions: vec![
                WeightsRegion {
                    len: 4096,
                    sha256: [1; 32],
                },
                WeightsRegion {
                    len: 1000,
                    sha256: [2; 32],
                },
            ],
        }),
        Message::WeightsChunk(WeightsChunk {
            data: vec![0x5A; 256].into(),
        }),
        Message::StageReady(StageReady {
            plan_id: 1,
            layer_start: 0,
            layer_end: 12,
            resident_bytes: 1 << 28,
            load_ms: 900,
        }),
        Message::Forward(Forward {
            session_id: 9,
            seq: 1,
            plan_id: 1,
            positions: vec![0, 1, 2],
            payload: Payload::Tokens(vec![1, 2, 3]),
            want: Want::Nothing,
            reply_to: addr,
            resume: Some(Resume {
                from_session: 3,
                len: 96,
            }),
        }),
        Message::Forward(Forward {
            session_id: 9,
            seq: 2,
            plan_id: 1,
            positions: vec![3, 4],
            payload: Payload::Hidden(hidden),
            want: Want::Token(SamplingSpec {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                penalty_tokens: vec![1, 2],
                ignore_eos: true,
                json: Some(shoal_wire::JsonAnswer {
                    grammar: r#"{"type":"object"}"#.to_owned(),
                    lead: b" {".to_vec(),
                    answer: vec![90, 91],
                }),
                ..SamplingSpec::greedy()
            }),
            reply_to: "[::1]:7070".parse().unwrap_or(addr),
            resume: None,
        }),
        Message::Forward(Forward {
            session_id: 9,
            seq: 3,
            plan_id: 1,
            positions: vec![5],
            payload: Payload::Tokens(vec![4]),
            want: Want::Logits {
                rows: LogitRows::All,
                dtype: DType::F32,
            },
            reply_to: addr,
            resume: None,
        }),
        Message::Token(Token {
            session_id: 9,
            seq: 2,
            token_id: 42,
            logprob: Some(-0.25),
            top: vec![(3, -1.5), (9, -2.0)],
        }),
        Message::Logits(Logits {
            session_id: 9,
            seq: 3,
            logits,
        }),
        Message::EndSession(EndSession {
            session_id: 9,
            keep: true,
        }),
        Message::Truncate(Truncate {
            session_id: 9,
            len: 4,
        }),
        Message::Forward(Forward {
            session_id: 9,
            seq: 4,
            plan_id: 1,
            positions: vec![6, 7, 8],
            payload: Payload::Tokens(vec![4, 17, 23]),
            want: Want::Verify {
                spec: SamplingSpec::greedy(),
                draft: vec![17, 23],
            },
            reply_to: addr,
            resume: None,
        }),
        Message::Verified(Verified {
            session_id: 9,
            seq: 4,
            tokens: vec![17, 29],
        }),
        Message::Forward(Forward {
            session_id: 10,
            seq: 0,
            plan_id: 1,
            positions: vec![0, 1],
            payload: Payload::Tokens(vec![1, 2]),
            want: Want::Normed {
                rows: LogitRows::First,
            },
            reply_to: addr,
            resume: None,
        }),
        Message::Heartbeat(Heartbeat {
            node: NodeInfo {
                node_id: "node-a".into(),
                version: "0.1.0".into(),
                peer_port: 7471,
                http_port: 8080,
                memory_total: 8 << 30,
                memory_free: 5 << 30,
                cores: 4,
                accelerator: String::new(),
                role: "stage".into(),
                models: vec!["smollm2-135m-instruct-q4_1.gguf".into()],
                stages: vec![HeldStage {
                    model_id: "smollm2-135m-instruct-q4_1.gguf".into(),
                    start: 10,
                    end: 30,
                    pass_us: 2_900,
                }],
                busy: 1,
                tokens_per_s: 80.5,
            },
            known: vec![KnownMember {
                node_id: "node-b".into(),
                addr,
            }],
        }),
        Message::Chaos(Chaos { down: true }),
        Message::Describe(Describe),
        Message::AgentCard(AgentCard {
            node_id: "agent-1".into(),
            role: "critic".into(),
            model_id: "smollm2-135m-instruct-q4_1.gguf".into(),
            model_name: "SmolLM2 135M Instruct".into(),
            context_length: 8192,
            tokens_per_s: 55.5,
            thermal_penalty: 0.9,
            busy: 1,
            parameters: 134_515_008,
        }),
        Message::Ask(Ask {
            request_id: 11,
            system: Some("You are a careful critic.".into()),
            messages: vec![
                ChatTurn {
                    role: "user".into(),
                    content: "What is 2+2?".into(),
                },
                ChatTurn {
                    role: "assistant".into(),
                    content: "5".into(),
                },
                ChatTurn {
                    role: "user".into(),
                    content: "Check that.".into(),
                },
            ],
            max_tokens: 64,
            temperature: 0.7,
            top_p: 0.9,
            seed: 5,
            stop: vec!["\n\n".into(), "</s>".into()],
            choices: Vec::new(),
            request: Some(
                r#"{"messages":[{"role":"user","content":"weather?"}],"tools":[{"type":"function","function":{"name":"get_weather"}}],"tool_choice":"required"}"#
                    .into(),
            ),
        }),
        Message::Ask(Ask {
            request_id: 12,
            system: None,
            messages: vec![ChatTurn {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            choices: vec!["CODE".into(), "MATH".into(), "SIMPLE_FACT".into()],
            request: None,
        }),
        Message::Answer(Answer {
            request_id: 11,
            text: "2+2 is 4, not 5.".into(),
            finish: Finish::Stop,
            prompt_tokens: 40,
            completion_tokens: 9,
            elapsed_ms: 250,
            response: Some(
                r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#
                    .into(),
            ),
        }),
        Message::GetProfile(GetProfile {
            model_id: "qwen2.5-coder-0.5b-instruct.gguf".into(),
            model_sha256: [3; 32],
        }),
        Message::Profile(Profile {
            node_id: "pi".into(),
            free_memory_bytes: 4 << 30,
            decode_ms_per_layer: 2.5,
            prefill_ms_per_layer_token: 0.3,
        }),
    ])
}

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz_seeds DIR");
        return ExitCode::FAILURE;
    };
    let result = (|| -> Result<usize, Box<dyn std::error::Error>> {
        std::fs::create_dir_all(&dir)?;
        let messages = seeds()?;
        for (i, msg) in messages.iter().enumerate() {
            std::fs::write(
                dir.join(format!("seed-{i:02}-{}", msg.name())),
                msg.to_frame()?,
            )?;
        }
        Ok(messages.len())
    })();
    match result {
        Ok(n) => {
            println!("wrote {n} seed frames to {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
