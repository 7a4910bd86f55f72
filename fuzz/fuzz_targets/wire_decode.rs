//! Fuzzes the wire decoder (issue #4): arbitrary bytes, read two ways.
//!
//! 1. As a stream of frames, the way `Connection::read_frame` consumes a socket: header checks,
//!    bounds, then the message parser.
//! 2. As a bare payload of every message type (the first byte picks the type), so the parsers
//!    get every input without the fuzzer first having to find a valid header.
//!
//! Besides "no panic, no overflow, no runaway allocation", it checks two properties: whatever
//! decodes re-encodes to exactly the same bytes (one encoding per message), and every proper
//! prefix of a decoded frame is "incomplete", never an error.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shoal_wire::{check_frame, decode_frame, Limits, Message, MessageType, Payload, HEADER_LEN};

fn exercise(msg: &Message) {
    // Decode activations too: the shape and byte count must agree.
    let act = match msg {
        Message::Forward(f) => match &f.payload {
            Payload::Hidden(a) => Some(a),
            Payload::Tokens(_) => None,
        },
        Message::Logits(l) => Some(&l.logits),
        _ => None,
    };
    if let Some(a) = act {
        let values = a.to_f32();
        assert_eq!(
            values.len() as u64,
            u64::from(a.rows()) * u64::from(a.cols())
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // A small bound keeps each run fast; the code path is the same as with the 64 MiB default.
    let limits = Limits {
        max_payload: 1 << 20,
    };

    let mut rest = data;
    while let Ok(Some((msg, used))) = decode_frame(rest, &limits) {
        assert!(used >= HEADER_LEN && used <= rest.len());
        let again = msg.to_frame().expect("a decoded message re-encodes");
        assert_eq!(
            &again[..],
            &rest[..used],
            "decode then encode changed the bytes"
        );
        assert!(matches!(check_frame(&rest[..used - 1], &limits), Ok(None)));
        exercise(&msg);
        rest = &rest[used..];
    }

    if let Some((&tag, payload)) = data.split_first() {
        let ty = MessageType::ALL[usize::from(tag) % MessageType::ALL.len()];
        if let Ok(msg) = Message::parse(ty, Bytes::copy_from_slice(payload)) {
            assert_eq!(msg.message_type(), ty);
            let mut out = Vec::new();
            msg.encode_payload(&mut out);
            assert_eq!(&out[..], payload, "parse then encode changed the payload");
            exercise(&msg);
        }
    }
});
