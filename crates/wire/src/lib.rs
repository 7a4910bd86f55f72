//! Shoal's peer protocol: frames, messages, activation encoding and connections.
//!
//! Nodes of a ring talk through this crate: the head sends `LoadStage` to set up stages, then
//! `Forward`s of tokens or hidden states flow stage to stage, and the last stage sends a
//! `Token` (or `Logits`) back to the head (design §3, issue #4). In swarm mode the head asks
//! whole-model agents who they are (`Describe` → `AgentCard`) and puts questions to them as
//! text (`Ask` → `Answer`), failures coming back as `Error` (design §4, issue #5). The crate
//! knows nothing of the engine: activations are `f32` matrices in memory and f16 / bf16 / f32
//! bytes on the wire.
//!
//! # Frames
//!
//! Every message travels in one frame: a 12-byte header, then the payload. All integers are
//! little-endian.
//!
//! | offset | size | field | value |
//! |---:|---:|---|---|
//! | 0 | 4 | magic | `b"SHOL"` ([`MAGIC`]) |
//! | 4 | 2 | version | `u16`, [`PROTOCOL_VERSION`] = 13 (2: `Forward` carries its `plan_id`; 3: the prompt cache's `Forward.resume` and `EndSession.keep`; 4: weights over the LAN, `LoadStage.weights_from`; 5: constrained answers, `SamplingSpec.ignore_eos` and `.json`; 6: whole API requests through the swarm, `Ask.request` and `Answer.response`; speculative decoding through the ring, `Want::Verify` and `Verified`; 7: several sources of weights, `LoadStage.weights_from` a list; 8: constraints that open after a trigger, `JsonAnswer.lead`; 9: no new bytes, but a JSON schema's object that lists `properties` without `additionalProperties` takes no other keys, so both ends of a ring must read schemas alike; 10: `HelloAck.idle_timeout`, so a dialler keeps a link alive by its peer's idle timeout; 11: embeddings through the ring, `Want::Normed`, and the error code 12, `context_length`; 12: a weight transfer resumed from another holder, `GetWeights.resume_from`; `LogitRows` 2, the first row only; 13: the node names the regions it lacks after the manifest, `WeightsWant`, in place of `GetWeights.resume_from`) |
//! | 6 | 2 | type | `u16`, a [`MessageType`] id (table below) |
//! | 8 | 4 | length | `u32`, payload bytes that follow, ≤ [`Limits::max_payload`] (default 64 MiB) |
//! | 12 | length | payload | the message's fields, in the layout its type documents |
//!
//! A reader refuses a frame — and the connection it came on — as soon as the bytes that show a
//! problem have arrived: a wrong magic byte, a version not in [`SUPPORTED_VERSIONS`] (the error
//! lists them), an unknown type, or a length over the bound. The bound is checked on the header
//! alone, before anything is allocated for the payload. Fewer bytes than a whole frame is not an
//! error but "incomplete" (`Ok(None)` from [`check_frame`]). Inside the payload every length is
//! checked against its field's bound and against the bytes left before a `Vec` or `String` is
//! made, and the parse of every message ends by checking that nothing is left over.
//!
//! # Messages
//!
//! | id | message | direction | purpose |
//! |---|---|---|---|
//! | `0x0001` | [`Hello`] | dialler → acceptor | who is calling (node id, release, [`Capabilities`]) |
//! | `0x0002` | [`HelloAck`] | acceptor → dialler | who answered, and how long it lets a silent connection live (protocol 10) |
//! | `0x0003` | [`ErrorMessage`] | any | a failure with an [`ErrorCode`], optionally for one session |
//! | `0x0004` | [`Ping`] | any | round-trip probe (`nonce`) |
//! | `0x0005` | [`Pong`] | any | answer with the same `nonce` |
//! | `0x0010` | [`LoadStage`] | head → node | load layers `[start, end)` of a model (by id and sha256) |
//! | `0x0011` | [`StageReady`] | node → head | the stage is loaded |
//! | `0x0020` | [`Forward`] | head → stage → … → last stage | tokens or hidden states, the plan, positions, sampling, `reply_to` |
//! | `0x0021` | [`Token`] | last stage → head | the sampled token (+ its logprob and the likeliest alternatives, when asked) |
//! | `0x0022` | [`Logits`] | last stage → head | logits for the last or every row, or the normed hidden states an embedding is pooled from (protocol 11; only the first row for CLS pooling, protocol 12) |
//! | `0x0023` | [`EndSession`] | head → stages | drop a session's KV cache |
//! | `0x0024` | [`Truncate`] | head → stages | roll a session's KV cache back to a length |
//! | `0x0030` | [`Describe`] | head → agent | who are you (empty payload) |
//! | `0x0031` | [`AgentCard`] | agent → head | node id, role, model, context length, measured tokens/s, thermal penalty, requests busy |
//! | `0x0032` | [`Ask`] | head → agent | a conversation to answer: system prompt override, turns, sampling, stop strings, choices the answer is limited to |
//! | `0x0033` | [`Answer`] | agent → head | the generated text, finish reason, token counts, time taken |
//! | `0x0040` | [`GetProfile`] | head → node | measure yourself on this model (by file name and sha256; with a sha256 the head serves its weights on the same connection) |
//! | `0x0041` | [`Profile`] | node → head | decode and prefill ms per layer, free memory |
//! | `0x0050` | [`Heartbeat`] | member ↔ member | who the sender is ([`NodeInfo`]) and the members it knows |
//! | `0x0051` | [`Chaos`] | member → member | play dead, or stop (the dashboard's kill and heal); answered in kind |
//! | `0x0060` | [`GetWeights`] | node → holder | send me the share of a model (by id and sha256) that these layers need |
//! | `0x0061` | [`WeightsManifest`] | holder → node | the stage file's length and its regions' SHA-256 |
//! | `0x0062` | [`WeightsChunk`] | holder → node | the next bytes of the regions wanted |
//! | `0x0063` | [`WeightsWant`] | node → holder | the regions I lack, sent after every manifest (protocol 13): all of them for a fresh transfer, else those neither a transfer another holder cut short nor a stage file kept before holds |
//!
//! Shared field encodings: `bool` and option tags are one byte, 0 or 1; strings are a `u32`
//! byte length then UTF-8; vectors of `u32` are a `u32` count then the elements; a socket
//! address is a family byte (4 or 6), 4 or 16 octets and a `u16` port; activations are
//! `u32` rows, `u32` cols, a [`DType`] byte (0 f16, 1 bf16, 2 f32) and `rows × cols` elements.
//! Lists of strings (an `Ask`'s turns, stop strings and choices) are a `u32` count then the elements.
//! Every message has exactly one encoding, so decode-then-encode gives back the same bytes.
//!
//! # Connections
//!
//! [`Connection`] reads and writes frames over a [`PeerStream`] (TCP with `TCP_NODELAY`,
//! encrypted under the swarm key when the swarm has one: [`secure`]) or any byte stream.
//! [`Transport`] dials with a deadline on every step; [`serve_peers`] runs a [`PeerService`]
//! per accepted peer, so a malformed or hostile frame closes that peer's connection and
//! nothing else, and silent or surplus connections cannot lock real peers out.

mod activations;
mod codec;
mod connection;
mod error;
mod frame;
pub mod handshake;
mod key;
mod message;
pub mod secure;
mod server;
mod transport;

pub use activations::{
    decode_activations, encode_activations, Activations, DType, MAX_COLS, MAX_ROWS,
};
pub use connection::{Connection, FrameReader, FrameWriter, READ_CHUNK};
pub use error::WireError;
pub use frame::{
    check_frame, decode_frame, FrameHeader, Limits, DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAGIC,
    PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
pub use handshake::{client_handshake, server_handshake};
pub use key::{KeyError, SwarmKey, KEY_LEN};
pub use message::{
    AgentCard, Answer, Ask, Capabilities, Chaos, ChatTurn, Describe, EndSession, ErrorCode,
    ErrorMessage, Finish, Forward, GetProfile, GetWeights, Heartbeat, HeldStage, Hello, HelloAck,
    JsonAnswer, KnownMember, LoadStage, LogitRows, Logits, Message, MessageType, NodeInfo, Payload,
    Ping, Pong, Profile, Resume, SamplingSpec, StageReady, Token, Truncate, Verified, Want,
    WeightsChunk, WeightsManifest, WeightsRegion, WeightsWant, MAX_ACCELERATOR, MAX_API_JSON,
    MAX_CHAT_ROLE, MAX_CHAT_TEXT, MAX_CHAT_TURNS, MAX_CHOICES, MAX_CHOICE_LEN, MAX_ERROR_MESSAGE,
    MAX_GRAMMAR, MAX_HELD_STAGES, MAX_KNOWN_MEMBERS, MAX_LEAD, MAX_MODELS, MAX_MODEL_ID,
    MAX_MODEL_NAME, MAX_NODE_ID, MAX_PENALTY_TOKENS, MAX_ROLE, MAX_SOFTWARE_VERSION,
    MAX_STAGE_FILE, MAX_STOP, MAX_STOP_LEN, MAX_TOKENS, MAX_TOP_LOGPROBS, MAX_WEIGHTS_CHUNK,
    MAX_WEIGHT_REGIONS, MAX_WEIGHT_SOURCES,
};
pub use secure::PeerStream;
pub use server::{serve_peers, PeerService, RemotePeer, ServeConfig};
pub use transport::{
    Transport, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, MIN_LINK_IDLE_TIMEOUT,
    STALL_TIMEOUT,
};

/// The reading half of a split peer connection.
pub type PeerReader = FrameReader<tokio::io::ReadHalf<PeerStream>>;
/// The writing half of a split peer connection.
pub type PeerWriter = FrameWriter<tokio::io::WriteHalf<PeerStream>>;
