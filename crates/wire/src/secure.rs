//! Authenticated encryption under the frames: the Noise handshake that proves both ends hold
//! the swarm key, and [`PeerStream`], the byte stream every [`crate::Connection`] reads and
//! writes (encrypted when the swarm has a key, plain TCP on a loopback-only node without one).
//!
//! # The construction (see `docs/SECURITY.md` for why)
//!
//! `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`, the swarm key as the pre-shared key, the prologue
//! `"shoal peer protocol 1"`. One round trip: the dialler sends `psk, e`, the acceptor answers
//! `e, ee`. Each message carries an authentication tag under keys that depend on the PSK, so the
//! acceptor knows the dialler holds the key after message 1, the dialler knows the acceptor
//! does after message 2, and a recorded message 1 replayed by someone else leads nowhere: the
//! session keys also depend on both fresh ephemeral keys (forward secrecy). Nothing is acted on
//! until the first transport record (the `Hello` frame) decrypts.
//!
//! On the wire, each side first sends the 8-byte [`PREAMBLE`], then `u16` big-endian length +
//! handshake message. After the handshake every record is `u16` big-endian length +
//! ChaCha20-Poly1305 ciphertext of at most 65,519 plaintext bytes + 16-byte tag, with the
//! nonce counted by each side (never sent): a record that was altered, dropped, reordered or
//! replayed fails to decrypt, and the connection ends.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use snow::{Builder, StatelessTransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::WireError;
use crate::frame::{decode_frame, Limits, MAGIC};
use crate::key::SwarmKey;
use crate::message::{ErrorCode, ErrorMessage, Message};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake hash: a peer of another protocol or version fails the handshake.
const PROLOGUE: &[u8] = b"shoal peer protocol 1";
/// What a keyed connection starts with, both ways. It differs from a frame's magic in its
/// first four bytes, so a node can tell a keyed peer from a plain one and say so.
pub const PREAMBLE: [u8; 8] = *b"SHOALNK1";
/// Bytes of a Poly1305 tag.
const TAG_LEN: usize = 16;
/// Largest Noise message.
const MAX_RECORD: usize = 65_535;
/// Largest plaintext in one record.
const MAX_PLAINTEXT: usize = MAX_RECORD - TAG_LEN;
/// Most plaintext one `poll_write` seals ahead of the socket, so a large frame costs few
/// calls while the buffer stays bounded.
const MAX_SEALED_AHEAD: usize = 4 * MAX_PLAINTEXT;
/// A handshake message: an ephemeral key and a tag (48 bytes); anything longer is refused.
const MAX_HANDSHAKE_MESSAGE: usize = 64;
/// Largest plaintext `Error` frame read from a peer that refused the handshake.
const MAX_REFUSAL: u32 = 4096;

/// The bytes between two peers: plain TCP, or TCP under the swarm key's encryption. (Any
/// byte stream in place of TCP, for tests and fuzzing.)
#[derive(Debug)]
pub struct PeerStream<S = TcpStream> {
    tcp: S,
    sealed: Option<Box<Sealed>>,
}

/// The encrypting state of a keyed stream.
struct Sealed {
    cipher: StatelessTransportState,
    send_nonce: u64,
    recv_nonce: u64,
    /// Received bytes not yet opened: `inbox[start..end]`, at most one whole record.
    inbox: Box<[u8]>,
    start: usize,
    end: usize,
    /// Opened plaintext not yet read: `opened[read..]`.
    opened: Vec<u8>,
    read: usize,
    /// Sealed records not yet written: `outbox[sent..]`.
    outbox: Vec<u8>,
    sent: usize,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("send_nonce", &self.send_nonce)
            .field("recv_nonce", &self.recv_nonce)
            .finish_non_exhaustive()
    }
}

impl PeerStream<TcpStream> {
    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> PeerStream<S> {
    /// A plain stream: no key, no encryption (only for a loopback-only node, or tests).
    pub fn plain(tcp: S) -> Self {
        PeerStream { tcp, sealed: None }
    }

    /// Whether the bytes on the socket are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.sealed.is_some()
    }

    /// Runs the dialler's side of the handshake on `tcp`.
    pub async fn initiate(mut tcp: S, key: &SwarmKey) -> Result<Self, WireError> {
        let mut noise = builder(key)?.build_initiator().map_err(noise_error)?;
        let mut message = [0u8; MAX_HANDSHAKE_MESSAGE];
        let len = noise
            .write_message(&[], &mut message)
            .map_err(noise_error)?;
        send_handshake(&mut tcp, &message[..len]).await?;
        let reply = match read_handshake(&mut tcp).await? {
            Opening::Noise(reply) => reply,
            Opening::Plaintext(refusal) => {
                return Err(handshake_failed(format!(
                    "the peer refused the swarm key: {refusal}"
                )))
            }
        };
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        noise.read_message(&reply, &mut payload).map_err(|_| {
            handshake_failed("the peer holds another swarm key (its answer does not authenticate)")
        })?;
        let cipher = noise.into_stateless_transport_mode().map_err(noise_error)?;
        Ok(PeerStream::sealed(tcp, cipher))
    }

    /// Runs the acceptor's side of the handshake on `tcp`. A peer without the key, or with
    /// another, is told so in a plain `Error` frame (it learns nothing else) and refused.
    pub async fn respond(mut tcp: S, key: &SwarmKey) -> Result<Self, WireError> {
        let mut noise = builder(key)?.build_responder().map_err(noise_error)?;
        let message = match read_handshake(&mut tcp).await? {
            Opening::Noise(message) => message,
            Opening::Plaintext(_) => {
                refuse(
                    &mut tcp,
                    "this node's peer port needs the swarm key; start the caller with the same \
                     --swarm-key",
                )
                .await;
                return Err(handshake_failed(
                    "a peer without a swarm key tried to connect (it sent a plain frame)",
                ));
            }
        };
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        if noise.read_message(&message, &mut payload).is_err() {
            refuse(
                &mut tcp,
                "the swarm keys differ; give every node the same key (`shoal key new` makes one)",
            )
            .await;
            return Err(handshake_failed(
                "a peer with another swarm key tried to connect",
            ));
        }
        let mut answer = [0u8; MAX_HANDSHAKE_MESSAGE];
        let len = noise.write_message(&[], &mut answer).map_err(noise_error)?;
        send_handshake(&mut tcp, &answer[..len]).await?;
        let cipher = noise.into_stateless_transport_mode().map_err(noise_error)?;
        Ok(PeerStream::sealed(tcp, cipher))
    }

    fn sealed(tcp: S, cipher: StatelessTransportState) -> Self {
        PeerStream {
            tcp,
            sealed: Some(Box::new(Sealed {
                cipher,
                send_nonce: 0,
                recv_nonce: 0,
                inbox: vec![0; 2 + MAX_RECORD].into_boxed_slice(),
                start: 0,
                end: 0,
                opened: Vec::new(),
                read: 0,
                outbox: Vec::new(),
                sent: 0,
            })),
        }
    }
}

fn builder(key: &SwarmKey) -> Result<Builder<'_>, WireError> {
    let params = NOISE_PARAMS
        .parse()
        .map_err(|e| handshake_failed(format!("Noise parameters: {e}")))?;
    Builder::new(params)
        .psk(0, key.bytes())
        .and_then(|b| b.prologue(PROLOGUE))
        .map_err(noise_error)
}

fn noise_error(e: snow::Error) -> WireError {
    handshake_failed(format!("Noise: {e}"))
}

fn handshake_failed(detail: impl Into<String>) -> WireError {
    WireError::Handshake {
        detail: detail.into(),
    }
}

async fn send_handshake(
    tcp: &mut (impl AsyncWrite + Unpin),
    message: &[u8],
) -> Result<(), WireError> {
    let mut out = Vec::with_capacity(PREAMBLE.len() + 2 + message.len());
    out.extend_from_slice(&PREAMBLE);
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    tcp.write_all(&out).await?;
    Ok(())
}

/// What a peer opened with: a handshake message, or a plain frame (its `Error` text, or a
/// description of it).
enum Opening {
    Noise(Vec<u8>),
    Plaintext(String),
}

async fn read_handshake(tcp: &mut (impl AsyncRead + Unpin)) -> Result<Opening, WireError> {
    let mut preamble = [0u8; PREAMBLE.len()];
    if let Err(e) = tcp.read_exact(&mut preamble).await {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            handshake_failed("the peer closed the connection during the handshake")
        } else {
            WireError::Io(e)
        });
    }
    if preamble[..MAGIC.len()] == MAGIC {
        return Ok(Opening::Plaintext(read_plain_frame(tcp, preamble).await));
    }
    if preamble != PREAMBLE {
        return Err(handshake_failed(format!(
            "the peer is not a shoal node (it opened with b\"{}\")",
            preamble.escape_ascii()
        )));
    }
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(handshake_failed(format!(
            "a handshake message of {len} bytes (at most {MAX_HANDSHAKE_MESSAGE})"
        )));
    }
    let mut message = vec![0u8; len];
    tcp.read_exact(&mut message).await?;
    Ok(Opening::Noise(message))
}

/// The plain frame a peer without encryption sent (best effort, bounded): an `Error`'s text,
/// or the name of what it sent.
async fn read_plain_frame(
    tcp: &mut (impl AsyncRead + Unpin),
    start: [u8; PREAMBLE.len()],
) -> String {
    let limits = Limits {
        max_payload: MAX_REFUSAL,
    };
    let mut buffer = start.to_vec();
    let mut chunk = [0u8; 512];
    loop {
        match decode_frame(&buffer, &limits) {
            Ok(Some((Message::Error(e), _))) => return format!("{} (code {})", e.message, e.code),
            Ok(Some((other, _))) => return format!("it sent a plain {} frame", other.name()),
            Ok(None) => {}
            Err(e) => return format!("it sent a plain frame that does not decode ({e})"),
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return "it runs without a swarm key".to_string(),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Tells a peer that failed the handshake why, in a plain `Error` frame (best effort).
async fn refuse(tcp: &mut (impl AsyncWrite + Unpin), why: &str) {
    let msg = Message::Error(ErrorMessage::new(ErrorCode::UNAUTHORIZED, None, why));
    if let Ok(frame) = msg.to_frame() {
        let _ = tcp.write_all(&frame).await;
        let _ = tcp.shutdown().await;
    }
}

fn decrypt_failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a record failed authentication (altered, replayed or out of order): connection closed",
    )
}

impl Sealed {
    /// Opens the record at the front of the inbox, if a whole one is there.
    fn open_record(&mut self) -> io::Result<bool> {
        let have = self.end - self.start;
        if have < 2 {
            return Ok(false);
        }
        let len = usize::from(u16::from_be_bytes([
            self.inbox[self.start],
            self.inbox[self.start + 1],
        ]));
        if len < TAG_LEN {
            return Err(decrypt_failed());
        }
        if have < 2 + len {
            return Ok(false);
        }
        let record = &self.inbox[self.start + 2..self.start + 2 + len];
        self.opened.resize(len - TAG_LEN, 0);
        let n = self
            .cipher
            .read_message(self.recv_nonce, record, &mut self.opened)
            .map_err(|_| decrypt_failed())?;
        self.opened.truncate(n);
        self.read = 0;
        self.recv_nonce += 1;
        self.start += 2 + len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(true)
    }

    /// Seals as much of `buf` as fits ahead of the socket; returns how much.
    fn seal(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(MAX_SEALED_AHEAD);
        for chunk in buf[..take].chunks(MAX_PLAINTEXT) {
            let at = self.outbox.len();
            let len = chunk.len() + TAG_LEN;
            self.outbox.extend_from_slice(&(len as u16).to_be_bytes());
            self.outbox.resize(at + 2 + len, 0);
            self.cipher
                .write_message(self.send_nonce, chunk, &mut self.outbox[at + 2..])
                .map_err(|e| io::Error::other(format!("encrypting a record: {e}")))?;
            self.send_nonce += 1;
        }
        Ok(take)
    }

    /// Writes sealed records to the socket until none are left.
    fn poll_drain<S: AsyncWrite + Unpin>(
        &mut self,
        tcp: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.sent < self.outbox.len() {
            let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.outbox[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outbox.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PeerStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let PeerStream { tcp, sealed } = self.get_mut();
        let Some(s) = sealed else {
            return Pin::new(tcp).poll_read(cx, buf);
        };
        loop {
            if s.read < s.opened.len() {
                let n = buf.remaining().min(s.opened.len() - s.read);
                buf.put_slice(&s.opened[s.read..s.read + n]);
                s.read += n;
                return Poll::Ready(Ok(()));
            }
            if s.open_record()? {
                continue;
            }
            if s.start > 0 {
                s.inbox.copy_within(s.start..s.end, 0);
                s.end -= s.start;
                s.start = 0;
            }
            let mut space = ReadBuf::new(&mut s.inbox[s.end..]);
            ready!(Pin::new(&mut *tcp).poll_read(cx, &mut space))?;
            let n = space.filled().len();
            if n == 0 {
                return Poll::Ready(if s.end == s.start {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection in the middle of a record",
                    ))
                });
            }
            s.end += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PeerStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let PeerStream { tcp, sealed } = self.get_mut();
        let Some(s) = sealed else {
            return Pin::new(tcp).poll_write(cx, buf);
        };
        ready!(s.poll_drain(tcp, cx))?;
        let taken = s.seal(buf)?;
        // Start sending now; what the socket does not take yet goes on the next write or
        // flush (the bytes are already accepted, so a `Pending` here is not returned).
        if let Poll::Ready(Err(e)) = s.poll_drain(tcp, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let PeerStream { tcp, sealed } = self.get_mut();
        if let Some(s) = sealed {
            ready!(s.poll_drain(tcp, cx))?;
        }
        Pin::new(tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let PeerStream { tcp, sealed } = self.get_mut();
        if let Some(s) = sealed {
            ready!(s.poll_drain(tcp, cx))?;
        }
        Pin::new(tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    /// A reproducible pseudo-random stream.
    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        }
    }

    /// A dialler and an acceptor holding `key`, each over its end of a pipe that passes
    /// through `meddle` (which sees, and may change, every chunk the dialler sends).
    async fn pair(
        key: &SwarmKey,
        mut meddle: impl FnMut(usize, &mut Vec<u8>) + Send + 'static,
    ) -> (PeerStream<DuplexStream>, PeerStream<DuplexStream>) {
        let (dialler, mut relay_in) = duplex(1 << 16);
        let (mut relay_out, acceptor) = duplex(1 << 16);
        tokio::spawn(async move {
            let (mut from_dialler, mut to_dialler) = tokio::io::split(&mut relay_in);
            let (mut from_acceptor, mut to_acceptor) = tokio::io::split(&mut relay_out);
            let up = async {
                let mut seen = 0;
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = from_dialler.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut chunk = buf[..n].to_vec();
                    meddle(seen, &mut chunk);
                    seen += n;
                    if to_acceptor.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let _ = to_acceptor.shutdown().await;
            };
            let down = async {
                let _ = tokio::io::copy(&mut from_acceptor, &mut to_dialler).await;
                let _ = to_dialler.shutdown().await;
            };
            tokio::join!(up, down);
        });
        let k = key.clone();
        let accept = tokio::spawn(async move { PeerStream::respond(acceptor, &k).await });
        let d = PeerStream::initiate(dialler, key).await.unwrap();
        let a = accept.await.unwrap().unwrap();
        (d, a)
    }

    fn message(len: usize, seed: u64) -> Vec<u8> {
        let mut r = lcg(seed);
        (0..len).map(|_| r() as u8).collect()
    }

    #[tokio::test]
    async fn bytes_of_any_size_arrive_as_sent() {
        let key = SwarmKey::from_bytes([7; 32]);
        let (mut d, mut a) = pair(&key, |_, _| {}).await;
        assert!(d.is_encrypted() && a.is_encrypted());
        let sizes = [
            0,
            1,
            MAX_PLAINTEXT - 1,
            MAX_PLAINTEXT,
            MAX_PLAINTEXT + 1,
            300_001,
        ];
        let sent: Vec<u8> = sizes
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| message(n, i as u64))
            .collect();
        let writer = tokio::spawn(async move {
            for (i, &n) in sizes.iter().enumerate() {
                d.write_all(&message(n, i as u64)).await.unwrap();
                d.flush().await.unwrap();
            }
            d.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == sent, "{} bytes back of {}", got.len(), sent.len());
    }

    #[tokio::test]
    async fn a_changed_byte_anywhere_after_the_handshake_is_never_read_as_data() {
        const HANDSHAKE: usize = PREAMBLE.len() + 2 + 48;
        let key = SwarmKey::from_bytes([9; 32]);
        let sent = message(3 * MAX_PLAINTEXT, 42);
        let mut r = lcg(5);
        for _ in 0..24 {
            // Somewhere in the records that follow the handshake, one bit.
            let at = HANDSHAKE + (r() as usize) % (sent.len() + 3 * (2 + TAG_LEN));
            let bit = 1u8 << (r() % 8);
            let (mut d, mut a) = pair(&key, move |seen, chunk| {
                if (seen..seen + chunk.len()).contains(&at) {
                    chunk[at - seen] ^= bit;
                }
            })
            .await;
            let data = sent.clone();
            tokio::spawn(async move {
                let _ = d.write_all(&data).await;
                let _ = d.shutdown().await;
            });
            let mut got = Vec::new();
            let result = a.read_to_end(&mut got).await;
            assert!(result.is_err(), "a changed byte at {at} went unnoticed");
            assert!(
                sent.starts_with(&got),
                "what was read before the change is exactly what was sent"
            );
        }
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_is_refused() {
        let key = SwarmKey::from_bytes([1; 32]);
        for garbage in [
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            [PREAMBLE.as_slice(), &[0xff, 0xff]].concat(),
            [PREAMBLE.as_slice(), &[0, 48], &[0u8; 48]].concat(),
            PREAMBLE[..5].to_vec(),
        ] {
            let (mut peer, acceptor) = duplex(1024);
            peer.write_all(&garbage).await.unwrap();
            peer.shutdown().await.unwrap();
            let err = PeerStream::respond(acceptor, &key).await.unwrap_err();
            assert!(
                matches!(err, WireError::Handshake { .. } | WireError::Io(_)),
                "{err}"
            );
        }
    }
}
