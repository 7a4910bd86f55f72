#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Property-style tests with a seeded PRNG: random messages of every type round-trip byte for
//! byte, streams of them survive arbitrary read boundaries, and mutated frames never panic.

use bytes::Bytes;
use shoal_wire::{
    check_frame, decode_activations, decode_frame, encode_activations, Activations, AgentCard,
    Answer, Ask, Capabilities, Chaos, ChatTurn, Connection, DType, Describe, EndSession, ErrorCode,
    ErrorMessage, Finish, Forward, GetProfile, GetWeights, Heartbeat, HeldStage, Hello, HelloAck,
    JsonAnswer, KnownMember, Limits, LoadStage, LogitRows, Logits, Message, MessageType, NodeInfo,
    Payload, Ping, Pong, Profile, Resume, SamplingSpec, StageReady, Token, Truncate, Verified,
    Want, WeightsChunk, WeightsManifest, WeightsRegion, WeightsWant, WireError, HEADER_LEN,
    MAX_API_JSON, MAX_CHAT_TURNS, MAX_CHOICES, MAX_CHOICE_LEN, MAX_STOP, PROTOCOL_VERSION,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// SplitMix64: tiny, seeded, good enough to drive tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn u32(&mut self) -> u32 {
        self.next() as u32
    }
    fn logit_rows(&mut self) -> LogitRows {
        [LogitRows::Last, LogitRows::All, LogitRows::First][self.below(3) as usize]
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn string(&mut self, max: u64) -> String {
        const CHARS: &[char] = &['a', 'z', '0', '-', '.', 'é', '漢', '🐟', ' '];
        (0..self.below(max + 1))
            .map(|_| CHARS[self.below(CHARS.len() as u64) as usize])
            .collect::<String>()
    }
    fn node_id(&mut self) -> String {
        let mut s = self.string(20);
        s.push('n');
        s
    }
    fn u32s(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.u32()).collect()
    }
    fn addr(&mut self) -> SocketAddr {
        let ip = if self.bool() {
            IpAddr::V4(Ipv4Addr::from(self.u32()))
        } else {
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(self.next()) << 64) | u128::from(self.next()),
            ))
        };
        SocketAddr::new(ip, self.next() as u16)
    }
    fn dtype(&mut self) -> DType {
        [DType::F16, DType::BF16, DType::F32][self.below(3) as usize]
    }
    fn activations(&mut self, rows: u32) -> Activations {
        let cols = self.below(64) as u32 + 1;
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| (self.unit() - 0.5) * 100.0)
            .collect();
        Activations::from_f32(rows, cols, &values, self.dtype()).unwrap()
    }
    fn sampling(&mut self) -> SamplingSpec {
        let n = self.below(70) as usize;
        let logprob = self.bool();
        SamplingSpec {
            temperature: self.unit() * 2.0,
            top_k: self.below(100) as u32,
            top_p: self.unit(),
            min_p: self.unit(),
            repeat_penalty: 0.5 + self.unit(),
            frequency_penalty: self.unit() * 4.0 - 2.0,
            presence_penalty: self.unit() * 4.0 - 2.0,
            seed: self.next(),
            logprob,
            top_logprobs: if logprob { self.below(21) as u8 } else { 0 },
            penalty_tokens: self.u32s(n),
            ignore_eos: self.bool(),
            json: self.bool().then(|| {
                let answer = self.below(50) as usize;
                JsonAnswer {
                    grammar: if self.bool() {
                        String::new()
                    } else {
                        r#"{"type":"object","properties":{"a":{"type":"integer"}}}"#.to_owned()
                    },
                    lead: if self.bool() {
                        b"\n{".to_vec()
                    } else {
                        Vec::new()
                    },
                    answer: self.u32s(answer),
                }
            }),
        }
    }
}

fn random_message(rng: &mut Rng, ty: MessageType) -> Message {
    match ty {
        MessageType::Hello => Message::Hello(Hello {
            node_id: rng.node_id(),
            software_version: rng.string(10),
            capabilities: Capabilities(rng.next()),
        }),
        MessageType::HelloAck => Message::HelloAck(HelloAck {
            node_id: rng.node_id(),
            software_version: rng.string(10),
            capabilities: Capabilities(rng.next()),
            // Whole milliseconds from 1 to u32::MAX travel exactly (0 is "none").
            idle_timeout: rng
                .next()
                .is_multiple_of(2)
                .then(|| Duration::from_millis(1 + rng.next() % u64::from(u32::MAX))),
        }),
        MessageType::Error => Message::Error(ErrorMessage::new(
            ErrorCode(rng.next() as u16),
            rng.bool().then(|| rng.next()),
            rng.string(200),
        )),
        MessageType::Ping => Message::Ping(Ping { nonce: rng.next() }),
        MessageType::Pong => Message::Pong(Pong { nonce: rng.next() }),
        MessageType::LoadStage => {
            let start = rng.below(80) as u32;
            let head = rng.bool();
            Message::LoadStage(LoadStage {
                plan_id: rng.next(),
                model_id: rng.string(60),
                model_sha256: std::array::from_fn(|_| rng.next() as u8),
                layer_start: start,
                layer_end: start + 1 + rng.below(40) as u32,
                embed: rng.bool(),
                head,
                activation_dtype: rng.dtype(),
                max_context: rng.u32(),
                next: (!head).then(|| rng.addr()),
                weights_from: (0..rng.below(4)).map(|_| rng.addr()).collect(),
            })
        }
        MessageType::StageReady => {
            let start = rng.below(80) as u32;
            Message::StageReady(StageReady {
                plan_id: rng.next(),
                layer_start: start,
                layer_end: start + rng.below(40) as u32,
                resident_bytes: rng.next(),
                load_ms: rng.u32(),
            })
        }
        MessageType::Forward => {
            let rows = rng.below(20) as u32 + 1;
            let first = rng.below(1 << 20) as u32;
            Message::Forward(Forward {
                session_id: rng.next(),
                seq: rng.next(),
                plan_id: rng.next(),
                positions: (first..first + rows).collect(),
                payload: if rng.bool() {
                    Payload::Tokens(rng.u32s(rows as usize))
                } else {
                    Payload::Hidden(rng.activations(rows))
                },
                want: match rng.below(5) {
                    0 => Want::Nothing,
                    1 => Want::Token(rng.sampling()),
                    2 => Want::Verify {
                        spec: rng.sampling(),
                        draft: rng.u32s(rows as usize - 1),
                    },
                    3 => Want::Normed {
                        rows: rng.logit_rows(),
                    },
                    _ => Want::Logits {
                        rows: rng.logit_rows(),
                        dtype: rng.dtype(),
                    },
                },
                reply_to: rng.addr(),
                resume: rng.bool().then(|| Resume {
                    from_session: rng.next(),
                    len: rng.u32(),
                }),
            })
        }
        MessageType::Token => {
            let logprob = rng.bool().then(|| -rng.unit() * 30.0);
            let top = match logprob {
                Some(_) => (0..rng.below(21))
                    .map(|_| (rng.u32(), -rng.unit() * 30.0))
                    .collect(),
                None => Vec::new(),
            };
            Message::Token(Token {
                session_id: rng.next(),
                seq: rng.next(),
                token_id: rng.u32(),
                logprob,
                top,
            })
        }
        MessageType::Logits => {
            let rows = rng.below(5) as u32 + 1;
            Message::Logits(Logits {
                session_id: rng.next(),
                seq: rng.next(),
                logits: rng.activations(rows),
            })
        }
        MessageType::EndSession => Message::EndSession(EndSession {
            session_id: rng.next(),
            keep: rng.below(2) == 1,
        }),
        MessageType::Truncate => Message::Truncate(Truncate {
            session_id: rng.next(),
            len: rng.u32(),
        }),
        MessageType::Verified => {
            let n = rng.below(9) as usize + 1;
            Message::Verified(Verified {
                session_id: rng.next(),
                seq: rng.next(),
                tokens: rng.u32s(n),
            })
        }
        MessageType::Describe => Message::Describe(Describe),
        MessageType::GetProfile => Message::GetProfile(GetProfile {
            model_id: rng.string(40),
            model_sha256: std::array::from_fn(|_| rng.next() as u8),
        }),
        MessageType::Profile => Message::Profile(Profile {
            node_id: rng.node_id(),
            free_memory_bytes: rng.next(),
            decode_ms_per_layer: rng.unit() * 50.0,
            prefill_ms_per_layer_token: rng.unit() * 5.0,
        }),
        MessageType::AgentCard => Message::AgentCard(AgentCard {
            node_id: rng.node_id(),
            role: rng.string(12),
            model_id: rng.string(40),
            model_name: rng.string(40),
            context_length: rng.u32(),
            tokens_per_s: rng.unit() * 200.0,
            thermal_penalty: rng.unit(),
            busy: rng.below(10) as u32,
            parameters: rng.below(100_000_000_000),
        }),
        MessageType::Ask => {
            let turns = rng.below(6) as usize + 1;
            let stops = rng.below(MAX_STOP as u64 + 1) as usize;
            let choices = rng.below(8) as usize;
            Message::Ask(Ask {
                request_id: rng.next(),
                system: rng.bool().then(|| rng.string(80)),
                messages: (0..turns)
                    .map(|_| ChatTurn {
                        role: ["system", "user", "assistant", ""][rng.below(4) as usize].into(),
                        content: rng.string(200),
                    })
                    .collect(),
                max_tokens: rng.u32(),
                temperature: rng.unit() * 2.0,
                // (0, 1]: never exactly 0.
                top_p: 1.0 - rng.unit() * 0.99,
                seed: rng.next(),
                stop: (0..stops).map(|_| rng.string(8)).collect(),
                // A choice is never empty.
                choices: (0..choices)
                    .map(|_| format!("c{}", rng.string(12)))
                    .collect(),
                request: rng
                    .bool()
                    .then(|| format!("{{\"messages\":\"{}\"}}", rng.string(40))),
            })
        }
        MessageType::Answer => Message::Answer(Answer {
            request_id: rng.next(),
            text: rng.string(300),
            finish: if rng.bool() {
                Finish::Stop
            } else {
                Finish::Length
            },
            prompt_tokens: rng.u32(),
            completion_tokens: rng.u32(),
            elapsed_ms: rng.u32(),
            response: rng
                .bool()
                .then(|| format!("{{\"choices\":\"{}\"}}", rng.string(40))),
        }),
        MessageType::Chaos => Message::Chaos(Chaos { down: rng.bool() }),
        MessageType::GetWeights => {
            let start = rng.below(80) as u32;
            Message::GetWeights(GetWeights {
                model_id: rng.string(60),
                model_sha256: std::array::from_fn(|_| rng.next() as u8),
                layer_start: start,
                layer_end: start + 1 + rng.below(40) as u32,
                embed: rng.bool(),
                head: rng.bool(),
            })
        }
        MessageType::WeightsWant => {
            let mut at = 0u32;
            let regions = (0..rng.below(6))
                .map(|_| {
                    let start = at + rng.below(50) as u32;
                    at = start + 1 + rng.below(50) as u32;
                    start..at
                })
                .collect();
            Message::WeightsWant(WeightsWant { regions })
        }
        MessageType::WeightsManifest => {
            let regions: Vec<WeightsRegion> = (0..1 + rng.below(20))
                .map(|_| WeightsRegion {
                    len: 1 + rng.below(1 << 32),
                    sha256: std::array::from_fn(|_| rng.next() as u8),
                })
                .collect();
            Message::WeightsManifest(WeightsManifest {
                file_len: regions.iter().map(|r| r.len).sum(),
                regions,
            })
        }
        MessageType::WeightsChunk => Message::WeightsChunk(WeightsChunk {
            data: (0..1 + rng.below(3000))
                .map(|_| rng.next() as u8)
                .collect::<Vec<u8>>()
                .into(),
        }),
        MessageType::Heartbeat => {
            let models = rng.below(5) as usize;
            let stages = rng.below(4) as usize;
            let known = rng.below(6) as usize;
            Message::Heartbeat(Heartbeat {
                node: NodeInfo {
                    node_id: rng.node_id(),
                    version: rng.string(10),
                    peer_port: rng.below(65536) as u16,
                    http_port: rng.below(65536) as u16,
                    memory_total: rng.next(),
                    memory_free: rng.next(),
                    cores: rng.u32(),
                    accelerator: rng.string(20),
                    role: rng.string(12),
                    models: (0..models).map(|_| rng.string(40)).collect(),
                    stages: (0..stages)
                        .map(|_| {
                            let start = rng.below(100) as u32;
                            HeldStage {
                                model_id: rng.string(40),
                                start,
                                end: start + 1 + rng.below(100) as u32,
                                pass_us: rng.u32(),
                            }
                        })
                        .collect(),
                    busy: rng.u32(),
                    tokens_per_s: rng.unit() * 300.0,
                },
                known: (0..known)
                    .map(|_| KnownMember {
                        node_id: rng.node_id(),
                        addr: rng.addr(),
                    })
                    .collect(),
            })
        }
    }
}

#[test]
fn random_messages_of_every_type_round_trip_byte_for_byte() {
    let mut rng = Rng(0x0005_4031);
    let limits = Limits::default();
    for _ in 0..300 {
        for ty in MessageType::ALL {
            let msg = random_message(&mut rng, ty);
            let frame = msg
                .to_frame()
                .unwrap_or_else(|e| panic!("{ty}: {e}: {msg:?}"));
            assert_eq!(&frame[6..8], &ty.to_u16().to_le_bytes());
            let (back, used) = decode_frame(&frame, &limits).unwrap().unwrap();
            assert_eq!(used, frame.len());
            assert_eq!(back, msg);
            assert_eq!(back.to_frame().unwrap(), frame, "{ty}: re-encoding differs");
        }
    }
}

#[test]
fn every_prefix_of_every_message_is_incomplete() {
    let mut rng = Rng(7);
    let limits = Limits::default();
    for ty in MessageType::ALL {
        for _ in 0..5 {
            let frame = random_message(&mut rng, ty).to_frame().unwrap();
            for n in 0..frame.len() {
                assert!(
                    matches!(check_frame(&frame[..n], &limits), Ok(None)),
                    "{ty}: prefix of {n}/{} bytes",
                    frame.len()
                );
            }
        }
    }
}

#[test]
fn truncated_or_extended_payloads_are_errors() {
    // Cut the payload short (and fix the header length), or add a byte: never a panic, never
    // the original message.
    let mut rng = Rng(99);
    let limits = Limits::default();
    for ty in MessageType::ALL {
        for _ in 0..20 {
            let frame = random_message(&mut rng, ty).to_frame().unwrap();
            let payload_len = frame.len() - HEADER_LEN;
            if payload_len > 0 {
                let keep = rng.below(payload_len as u64) as usize;
                let mut short = frame[..HEADER_LEN + keep].to_vec();
                short[8..12].copy_from_slice(&(keep as u32).to_le_bytes());
                assert!(
                    decode_frame(&short, &limits).is_err(),
                    "{ty}: cut to {keep}"
                );
            }
            let mut long = frame.clone();
            long.push(rng.next() as u8);
            long[8..12].copy_from_slice(&((payload_len + 1) as u32).to_le_bytes());
            assert!(decode_frame(&long, &limits).is_err(), "{ty}: one byte more");
        }
    }
}

#[test]
fn mutated_frames_never_panic_and_what_parses_is_canonical() {
    // A small in-tree fuzzer (the real one is fuzz/fuzz_targets/wire_decode.rs): corrupt valid
    // frames at random; decoding must return, and anything that still decodes must re-encode
    // to exactly the bytes it came from.
    let mut rng = Rng(2024);
    let limits = Limits {
        max_payload: 1 << 16,
    };
    let mut decoded = 0;
    for i in 0..30_000 {
        let ty = MessageType::ALL[i % MessageType::ALL.len()];
        let mut frame = random_message(&mut rng, ty).to_frame().unwrap();
        for _ in 0..=rng.below(3) {
            match rng.below(4) {
                0 => {
                    let at = rng.below(frame.len() as u64) as usize;
                    frame[at] ^= 1 << rng.below(8);
                }
                1 => {
                    let at = HEADER_LEN + rng.below((frame.len() - HEADER_LEN) as u64 + 1) as usize;
                    frame.truncate(at.min(frame.len()));
                }
                2 => {
                    let at = rng.below(frame.len() as u64) as usize;
                    frame[at] = rng.next() as u8;
                }
                _ => frame.push(rng.next() as u8),
            }
        }
        if let Ok(Some((msg, used))) = decode_frame(&frame, &limits) {
            decoded += 1;
            assert_eq!(msg.to_frame().unwrap(), &frame[..used], "{msg:?}");
        }
    }
    assert!(
        decoded > 1000,
        "the mutations should leave some frames valid ({decoded})"
    );
}

#[test]
fn activation_encodings_match_the_reference_conversion() {
    let mut rng = Rng(3);
    let values: Vec<f32> = (0..5000)
        .map(|_| f32::from_bits(rng.u32()))
        .filter(|v| v.is_finite())
        .collect();
    let f16 = encode_activations(&values, DType::F16);
    let bf16 = encode_activations(&values, DType::BF16);
    for (i, v) in values.iter().enumerate() {
        assert_eq!(
            &f16[2 * i..2 * i + 2],
            &half::f16::from_f32(*v).to_le_bytes()
        );
        assert_eq!(
            &bf16[2 * i..2 * i + 2],
            &half::bf16::from_f32(*v).to_le_bytes()
        );
    }
    let back = decode_activations(&f16, DType::F16).unwrap();
    for (i, v) in back.iter().enumerate() {
        assert_eq!(
            v.to_bits(),
            half::f16::from_f32(values[i]).to_f32().to_bits()
        );
    }
    let exact = decode_activations(&encode_activations(&values, DType::F32), DType::F32).unwrap();
    assert_eq!(exact, values);
}

#[tokio::test]
async fn a_stream_of_frames_survives_any_read_boundaries() {
    let mut rng = Rng(11);
    let messages: Vec<Message> = (0..400)
        .map(|i| random_message(&mut rng, MessageType::ALL[i % MessageType::ALL.len()]))
        .collect();
    let bytes: Vec<u8> = messages
        .iter()
        .flat_map(|m| m.to_frame().unwrap())
        .collect();
    let (client, server) = tokio::io::duplex(1 << 12);
    let writer = tokio::spawn(async move {
        let mut client = client;
        let mut rng = Rng(12);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = (rng.below(300) as usize + 1).min(rest.len());
            client.write_all(&rest[..n]).await.unwrap();
            rest = &rest[n..];
        }
    });
    let mut conn = Connection::from_stream(server, Limits::default());
    for (i, expected) in messages.iter().enumerate() {
        let got = conn.read_frame().await.unwrap().unwrap();
        assert_eq!(&got, expected, "message {i}");
    }
    writer.await.unwrap();
    assert!(conn.read_frame().await.unwrap().is_none());
}

#[test]
fn hidden_payload_shares_the_frame_bytes() {
    // Activations keep the wire bytes; decoding converts once.
    let a = Activations::from_f32(2, 2, &[1.0, 2.0, 3.0, 4.0], DType::BF16).unwrap();
    assert_eq!(a.data().len(), 8);
    let b = Activations::from_encoded(2, 2, DType::BF16, Bytes::copy_from_slice(a.data())).unwrap();
    assert_eq!(b.to_f32(), [1.0, 2.0, 3.0, 4.0]);
}

fn decode(frame: &[u8]) -> Result<Message, WireError> {
    decode_frame(frame, &Limits::default()).map(|m| m.expect("a whole frame").0)
}

/// Writes a new payload length into a frame's header after its payload was edited.
fn fix_len(frame: &mut [u8]) {
    let len = (frame.len() - HEADER_LEN) as u32;
    frame[8..12].copy_from_slice(&len.to_le_bytes());
}

fn card() -> AgentCard {
    AgentCard {
        node_id: "a1".into(),
        role: "critic".into(),
        model_id: "m.gguf".into(),
        model_name: "M".into(),
        context_length: 8192,
        tokens_per_s: 40.0,
        thermal_penalty: 1.0,
        busy: 2,
        parameters: 134_515_008,
    }
}

fn ask() -> Ask {
    Ask {
        request_id: 7,
        system: Some("Be brief.".into()),
        messages: vec![ChatTurn {
            role: "user".into(),
            content: "2+2?".into(),
        }],
        max_tokens: 16,
        temperature: 0.0,
        top_p: 1.0,
        seed: 3,
        stop: vec!["\n".into()],
        choices: vec!["A".into(), "BC".into()],
        request: None,
    }
}

#[test]
fn agent_message_frame_bytes() {
    let frame = Message::Describe(Describe).to_frame().unwrap();
    assert_eq!(frame, [b'S', b'H', b'O', b'L', 13, 0, 0x30, 0, 0, 0, 0, 0]);

    let frame = Message::AgentCard(card()).to_frame().unwrap();
    #[rustfmt::skip]
    let expected = [
        b'S', b'H', b'O', b'L', 13, 0, 0x31, 0, 55, 0, 0, 0,
        2, 0, 0, 0, b'a', b'1',                         // node_id
        6, 0, 0, 0, b'c', b'r', b'i', b't', b'i', b'c', // role
        6, 0, 0, 0, b'm', b'.', b'g', b'g', b'u', b'f', // model_id
        1, 0, 0, 0, b'M',                               // model_name
        0x00, 0x20, 0, 0,                               // context_length 8192
        0, 0, 0x20, 0x42,                               // tokens_per_s 40.0
        0, 0, 0x80, 0x3F,                               // thermal_penalty 1.0
        2, 0, 0, 0,                                     // busy
        0x40, 0x89, 0x04, 0x08, 0, 0, 0, 0,             // parameters 134,515,008
    ];
    assert_eq!(frame, expected);
    assert_eq!(decode(&frame).unwrap(), Message::AgentCard(card()));

    let frame = Message::Ask(ask()).to_frame().unwrap();
    #[rustfmt::skip]
    let expected = [
        b'S', b'H', b'O', b'L', 13, 0, 0x32, 0, 87, 0, 0, 0,
        7, 0, 0, 0, 0, 0, 0, 0,                         // request_id
        1, 9, 0, 0, 0, b'B', b'e', b' ', b'b', b'r', b'i', b'e', b'f', b'.', // Some(system)
        1, 0, 0, 0,                                     // one turn
        4, 0, 0, 0, b'u', b's', b'e', b'r',
        4, 0, 0, 0, b'2', b'+', b'2', b'?',
        16, 0, 0, 0,                                    // max_tokens
        0, 0, 0, 0,                                     // temperature 0
        0, 0, 0x80, 0x3F,                               // top_p 1.0
        3, 0, 0, 0, 0, 0, 0, 0,                         // seed
        1, 0, 0, 0, 1, 0, 0, 0, b'\n',                  // stop ["\n"]
        2, 0, 0, 0, 1, 0, 0, 0, b'A', 2, 0, 0, 0, b'B', b'C', // choices ["A", "BC"]
        0,                                              // no request
    ];
    assert_eq!(frame, expected);
    assert_eq!(decode(&frame).unwrap(), Message::Ask(ask()));

    // `None` and `Some("")` are different requests and different bytes.
    let none = Message::Ask(Ask {
        system: None,
        ..ask()
    })
    .to_frame()
    .unwrap();
    let empty = Message::Ask(Ask {
        system: Some(String::new()),
        ..ask()
    })
    .to_frame()
    .unwrap();
    assert_eq!(&none[HEADER_LEN + 8..HEADER_LEN + 9], [0]);
    assert_eq!(&empty[HEADER_LEN + 8..HEADER_LEN + 13], [1, 0, 0, 0, 0]);
    // A whole API request comes last, tagged.
    let with_request = Ask {
        request: Some("{}".into()),
        ..ask()
    };
    let frame = Message::Ask(with_request.clone()).to_frame().unwrap();
    assert_eq!(frame[frame.len() - 7..], [1, 2, 0, 0, 0, b'{', b'}']);
    assert_eq!(decode(&frame).unwrap(), Message::Ask(with_request));

    let answer = Answer {
        request_id: 7,
        text: "4".into(),
        finish: Finish::Length,
        prompt_tokens: 20,
        completion_tokens: 1,
        elapsed_ms: 300,
        response: None,
    };
    let frame = Message::Answer(answer.clone()).to_frame().unwrap();
    #[rustfmt::skip]
    let expected = [
        b'S', b'H', b'O', b'L', 13, 0, 0x33, 0, 27, 0, 0, 0,
        7, 0, 0, 0, 0, 0, 0, 0,                         // request_id
        1, 0, 0, 0, b'4',                               // text
        1,                                              // finish: length
        20, 0, 0, 0,                                    // prompt_tokens
        1, 0, 0, 0,                                     // completion_tokens
        0x2C, 0x01, 0, 0,                               // elapsed_ms 300
        0,                                              // no response
    ];
    assert_eq!(frame, expected);
    assert_eq!(decode(&frame).unwrap(), Message::Answer(answer.clone()));
    let with_response = Answer {
        response: Some("{}".into()),
        ..answer
    };
    let frame = Message::Answer(with_response.clone()).to_frame().unwrap();
    assert_eq!(frame[frame.len() - 7..], [1, 2, 0, 0, 0, b'{', b'}']);
    assert_eq!(decode(&frame).unwrap(), Message::Answer(with_response));
}

#[test]
fn agent_messages_with_bad_values_are_refused_both_ways() {
    // Refused when writing...
    for bad in [
        AgentCard {
            tokens_per_s: f32::NAN,
            ..card()
        },
        AgentCard {
            tokens_per_s: -1.0,
            ..card()
        },
        AgentCard {
            thermal_penalty: 1.5,
            ..card()
        },
        AgentCard {
            thermal_penalty: f32::INFINITY,
            ..card()
        },
        AgentCard {
            node_id: String::new(),
            ..card()
        },
    ] {
        assert!(
            Message::AgentCard(bad.clone()).to_frame().is_err(),
            "{bad:?}"
        );
    }
    for bad in [
        Ask {
            temperature: f32::NAN,
            ..ask()
        },
        Ask {
            temperature: -0.5,
            ..ask()
        },
        Ask {
            top_p: 0.0,
            ..ask()
        },
        Ask {
            top_p: 1.01,
            ..ask()
        },
        Ask {
            messages: vec![],
            ..ask()
        },
        Ask {
            stop: vec!["x".into(); MAX_STOP + 1],
            ..ask()
        },
        Ask {
            request: Some("x".repeat(MAX_API_JSON + 1)),
            ..ask()
        },
        Ask {
            choices: vec!["x".into(); MAX_CHOICES + 1],
            ..ask()
        },
        Ask {
            choices: vec!["A".into(), String::new()],
            ..ask()
        },
        Ask {
            choices: vec!["x".repeat(MAX_CHOICE_LEN + 1)],
            ..ask()
        },
        Ask {
            messages: vec![ask().messages[0].clone(); MAX_CHAT_TURNS + 1],
            ..ask()
        },
    ] {
        assert!(Message::Ask(bad.clone()).to_frame().is_err(), "{bad:?}");
    }

    // ...and on receipt, when written by hand.
    let mut frame = Message::AgentCard(card()).to_frame().unwrap();
    // tokens_per_s, then thermal_penalty (4), busy (4) and parameters (8).
    let tps_at = frame.len() - 20;
    frame[tps_at..tps_at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let err = decode(&frame).unwrap_err();
    assert!(
        err.to_string()
            .contains("tokens_per_s is inf, expected a finite number"),
        "{err}"
    );

    let mut frame = Message::Ask(ask()).to_frame().unwrap();
    let temp_at = frame.len() - 1 - 15 - 9 - 8 - 4 - 4;
    frame[temp_at..temp_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let err = decode(&frame).unwrap_err();
    assert!(
        err.to_string()
            .contains("temperature is NaN, expected a finite number"),
        "{err}"
    );
}

#[test]
fn answer_finish_must_be_stop_or_length() {
    let answer = Answer {
        request_id: 1,
        text: "hi".into(),
        finish: Finish::Stop,
        prompt_tokens: 1,
        completion_tokens: 1,
        elapsed_ms: 1,
        response: None,
    };
    let mut frame = Message::Answer(answer).to_frame().unwrap();
    let finish_at = HEADER_LEN + 8 + 4 + 2;
    assert_eq!(frame[finish_at], 0);
    frame[finish_at] = 2;
    let err = decode(&frame).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed Answer: finish is 2, expected 0 (stop) or 1 (length)"
    );
}

#[test]
fn oversized_ask_counts_are_refused_on_the_count_alone() {
    let frame = Message::Ask(ask()).to_frame().unwrap();
    // The turn count, claiming far more turns than the bound: refused before any turn is read.
    let turns_at = HEADER_LEN + 8 + 1 + 4 + 9;
    let mut bad = frame.clone();
    bad[turns_at..turns_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        matches!(
            decode(&bad).unwrap_err(),
            WireError::TooLong {
                what: "messages",
                len: 0xFFFF_FFFF,
                ..
            }
        ),
        "turn count"
    );
    // A count within the bound but beyond the bytes present: truncated, not a panic.
    bad[turns_at..turns_at + 4].copy_from_slice(&(MAX_CHAT_TURNS as u32).to_le_bytes());
    assert!(matches!(
        decode(&bad).unwrap_err(),
        WireError::Truncated { .. } | WireError::Invalid { .. } | WireError::TooLong { .. }
    ));
    // The stop count (before the 15 bytes of the two choices and their count, and the
    // request's tag).
    let stop_at = frame.len() - 1 - 15 - 9;
    let mut bad = frame.clone();
    bad[stop_at..stop_at + 4].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(
        decode(&bad).unwrap_err(),
        WireError::TooLong {
            what: "stop",
            len: 9,
            ..
        }
    ));
    // The choice count.
    let choices_at = frame.len() - 1 - 15;
    let mut bad = frame.clone();
    bad[choices_at..choices_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&bad).unwrap_err(),
        WireError::TooLong {
            what: "choices",
            len: 0xFFFF_FFFF,
            ..
        }
    ));
    // A content length that lies.
    let content_len_at = turns_at + 4 + 8;
    let mut bad = frame.clone();
    bad[content_len_at..content_len_at + 4].copy_from_slice(&1_000u32.to_le_bytes());
    assert!(matches!(
        decode(&bad).unwrap_err(),
        WireError::Truncated { .. }
    ));
}

#[test]
fn agent_messages_refuse_leftover_bytes() {
    for msg in [
        Message::Describe(Describe),
        Message::AgentCard(card()),
        Message::Ask(ask()),
        Message::Answer(Answer {
            request_id: 1,
            text: String::new(),
            finish: Finish::Stop,
            prompt_tokens: 0,
            completion_tokens: 0,
            elapsed_ms: 0,
            response: None,
        }),
    ] {
        let mut frame = msg.to_frame().unwrap();
        frame.push(0);
        fix_len(&mut frame);
        let err = decode(&frame).unwrap_err();
        assert!(
            matches!(err, WireError::TrailingBytes { extra: 1, .. }),
            "{}: {err}",
            msg.name()
        );
    }
}

#[test]
fn profile_bytes_and_refusals() {
    let msg = Message::Profile(Profile {
        node_id: "pi".to_owned(),
        free_memory_bytes: 1 << 32,
        decode_ms_per_layer: 1.5,
        prefill_ms_per_layer_token: 0.25,
    });
    let frame = msg.to_frame().unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(b"SHOL");
    want.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    want.extend_from_slice(&0x0041u16.to_le_bytes());
    want.extend_from_slice(&(4u32 + 2 + 8 + 4 + 4).to_le_bytes());
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(b"pi");
    want.extend_from_slice(&(1u64 << 32).to_le_bytes());
    want.extend_from_slice(&1.5f32.to_le_bytes());
    want.extend_from_slice(&0.25f32.to_le_bytes());
    assert_eq!(frame, want);
    assert_eq!(decode(&frame).unwrap(), msg);
    for bad in [f32::NAN, -1.0, f32::INFINITY] {
        let msg = Message::Profile(Profile {
            node_id: "pi".to_owned(),
            free_memory_bytes: 0,
            decode_ms_per_layer: bad,
            prefill_ms_per_layer_token: 0.0,
        });
        assert!(msg.to_frame().is_err(), "{bad} must be refused");
    }
    let mut leftover = Message::GetProfile(GetProfile {
        model_id: "m.gguf".to_owned(),
        model_sha256: [0; 32],
    })
    .to_frame()
    .unwrap();
    leftover.push(0);
    fix_len(&mut leftover);
    assert!(matches!(
        decode(&leftover).unwrap_err(),
        WireError::TrailingBytes { extra: 1, .. }
    ));
}
