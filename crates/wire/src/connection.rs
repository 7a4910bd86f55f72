//! A connection to one peer: [`Connection::read_frame`] and [`Connection::write_frame`] over a
//! byte stream, in the manner of mini-redis's `connection.rs`.
//!
//! Reading keeps a buffer; a frame is parsed only once [`check_frame`] says it is complete and
//! within bounds, and its payload is shared with the buffer rather than copied. Memory follows
//! the bytes that actually arrive, not the length a header announces: the buffer grows at most
//! [`READ_CHUNK`] ahead of what has been received, so a peer that announces a 64 MiB frame
//! and sends 10 bytes costs about 1 MiB, not 64.
//!
//! The stream type is generic; between nodes it is a [`PeerStream`] (TCP, encrypted under the
//! swarm key when there is one, see [`crate::secure`]), in tests any in-memory pipe.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::error::WireError;
use crate::frame::{check_frame, Limits, HEADER_LEN};
use crate::message::{ErrorMessage, Message};
use crate::secure::PeerStream;

/// Most bytes the read buffer reserves ahead of what has arrived.
pub const READ_CHUNK: usize = 1 << 20;
/// Smallest reservation before a read, so small frames are read in few syscalls.
const MIN_READ: usize = 8 << 10;
/// An encode buffer larger than this is released after use, so one large frame does not pin
/// its memory for the life of the connection.
const KEEP_WRITE_BUFFER: usize = 4 << 20;
/// How long [`Connection::close_with_error`] tries to tell the peer before giving up.
const ERROR_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The receiving half of the frame protocol: a buffer and the limits.
#[derive(Debug)]
struct ReadState {
    buffer: BytesMut,
    limits: Limits,
    /// Longest wait for more bytes of a frame that has started to arrive.
    stall_timeout: Option<Duration>,
    /// Longest wait between frames, for the first byte of the next.
    idle_timeout: Option<Duration>,
}

impl ReadState {
    fn new(limits: Limits) -> Self {
        ReadState {
            buffer: BytesMut::with_capacity(MIN_READ),
            limits,
            stall_timeout: None,
            idle_timeout: None,
        }
    }

    /// Parses a frame if a whole one is buffered.
    fn parse_frame(&mut self) -> Result<Option<Message>, WireError> {
        let Some(header) = check_frame(&self.buffer, &self.limits)? else {
            return Ok(None);
        };
        let frame = self.buffer.split_to(header.frame_len()).freeze();
        Message::parse(header.message_type, frame.slice(HEADER_LEN..)).map(Some)
    }

    /// Bytes still missing from the frame at the front of the buffer (the header, or the rest
    /// of a frame whose header has passed [`check_frame`]).
    fn missing(&self) -> usize {
        let have = self.buffer.len();
        if have < HEADER_LEN {
            return HEADER_LEN - have;
        }
        let payload = u32::from_le_bytes([
            self.buffer[8],
            self.buffer[9],
            self.buffer[10],
            self.buffer[11],
        ]);
        (HEADER_LEN + payload as usize).saturating_sub(have)
    }

    async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> Result<Option<Message>, WireError> {
        loop {
            if let Some(msg) = self.parse_frame()? {
                return Ok(Some(msg));
            }
            // Reached only when the buffered bytes are a valid prefix, so `missing` reads a
            // header that has passed the bound check.
            self.buffer
                .reserve(self.missing().clamp(MIN_READ, READ_CHUNK));
            let mid_frame = !self.buffer.is_empty();
            let read = stream.read_buf(&mut self.buffer);
            // Mid-frame the stall deadline applies (a big frame on a slow link takes as long as
            // it takes, while bytes keep coming); between frames, the idle one.
            let (deadline, what) = if mid_frame {
                (self.stall_timeout, "waiting for the rest of a frame")
            } else {
                (self.idle_timeout, "idle, with no message from the peer")
            };
            let n = match deadline {
                Some(after) => tokio::time::timeout(after, read)
                    .await
                    .map_err(|_| WireError::Timeout { what, after })??,
                None => read.await?,
            };
            if n == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::ClosedMidFrame {
                        buffered: self.buffer.len(),
                    })
                };
            }
        }
    }
}

/// The sending half: an encode buffer reused across frames, and the limits.
#[derive(Debug)]
struct WriteState {
    out: Vec<u8>,
    limits: Limits,
}

impl WriteState {
    fn new(limits: Limits) -> Self {
        WriteState {
            out: Vec::new(),
            limits,
        }
    }

    async fn write_frame<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
        msg: &Message,
    ) -> Result<(), WireError> {
        self.out.clear();
        msg.encode_frame(&mut self.out, &self.limits)?;
        // One contiguous write per frame: with TCP_NODELAY it leaves at once, in as few
        // segments as the MSS allows.
        let result = stream.write_all(&self.out).await;
        if self.out.capacity() > KEEP_WRITE_BUFFER {
            self.out = Vec::new();
        }
        result?;
        stream.flush().await?;
        Ok(())
    }
}

/// A framed connection to one peer.
#[derive(Debug)]
pub struct Connection<S = PeerStream> {
    stream: S,
    read: ReadState,
    write: WriteState,
}

impl Connection<PeerStream> {
    /// Wraps an accepted or connected socket, unencrypted (between nodes, connections come
    /// from [`crate::Transport`], which encrypts them under the swarm key).
    pub fn new(stream: TcpStream, limits: Limits) -> Result<Self, WireError> {
        Connection::over(PeerStream::plain(stream), limits)
    }

    /// Wraps a peer stream, turning Nagle off (`TCP_NODELAY`): a decode step sends one small
    /// frame per hop, and waiting to coalesce it would add latency to every token.
    pub fn over(stream: PeerStream, limits: Limits) -> Result<Self, WireError> {
        stream.tcp().set_nodelay(true)?;
        Ok(Connection::from_stream(stream, limits))
    }

    /// Dials `addr`, unencrypted (tools and tests; nodes dial with [`crate::Transport::dial`]).
    pub async fn connect(addr: impl ToSocketAddrs, limits: Limits) -> Result<Self, WireError> {
        Connection::new(TcpStream::connect(addr).await?, limits)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Result<SocketAddr, WireError> {
        Ok(self.stream.tcp().peer_addr()?)
    }

    /// Whether the connection is encrypted under the swarm key.
    pub fn is_encrypted(&self) -> bool {
        self.stream.is_encrypted()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps any byte stream (an in-memory pipe in tests, an encrypted stream later).
    pub fn from_stream(stream: S, limits: Limits) -> Self {
        Connection {
            stream,
            read: ReadState::new(limits),
            write: WriteState::new(limits),
        }
    }

    /// Ends the connection with [`WireError::Timeout`] when a frame that has begun to arrive
    /// stalls for longer than `after` (`None`: wait for ever).
    pub fn set_stall_timeout(&mut self, after: Option<Duration>) {
        self.read.stall_timeout = after;
    }

    /// Ends the connection with [`WireError::Timeout`] when no frame begins to arrive for
    /// `after` (`None`, the default: wait for ever). A server sets it on the connections it
    /// accepted; a dialer keeps its links busy instead (see [`crate::Transport::idle_timeout`]).
    pub fn set_idle_timeout(&mut self, after: Option<Duration>) {
        self.read.idle_timeout = after;
    }

    /// The idle timeout in effect (see [`Connection::set_idle_timeout`]).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.read.idle_timeout
    }

    /// Reads the next message. `Ok(None)` when the peer closed the connection cleanly between
    /// frames. Any `Err` other than [`WireError::Io`] means the peer broke the protocol and the
    /// connection must be dropped.
    ///
    /// Cancel-safe: if the future is dropped (e.g. losing a `select!`), bytes already read stay
    /// in the buffer for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<Message>, WireError> {
        self.read.read_frame(&mut self.stream).await
    }

    /// Writes one message as one frame and flushes it. Fails without writing anything when the
    /// message is invalid or over the payload limit. Not cancel-safe: a frame cut short leaves
    /// the stream unusable.
    pub async fn write_frame(&mut self, msg: &Message) -> Result<(), WireError> {
        self.write.write_frame(&mut self.stream, msg).await
    }

    /// Tells the peer why its connection is being closed (an `Error` frame, best effort, for at
    /// most a second), then closes it. For a protocol violation the message names the problem,
    /// e.g. which versions this node supports.
    pub async fn close_with_error(mut self, err: &WireError) {
        let msg = Message::Error(ErrorMessage::new(err.code(), None, err.to_string()));
        let send = async {
            self.write_frame(&msg).await?;
            self.stream.shutdown().await?;
            Ok::<(), WireError>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(ERROR_SEND_TIMEOUT, send).await {
            tracing::debug!(error = %e, "could not tell the peer why its connection closed");
        }
    }

    /// Ends the connection after a failed read or handshake and hands the error back for
    /// the caller to return: a peer that broke the protocol is first told why
    /// ([`Connection::close_with_error`]); after an I/O error there is nobody to tell.
    pub async fn fail(self, err: WireError) -> WireError {
        if err.is_protocol_violation() {
            self.close_with_error(&err).await;
        }
        err
    }

    /// Splits into independent reading and writing halves, for a task that must read and write
    /// at the same time (a head sends `Forward`s while `Token`s come back).
    pub fn into_split(self) -> (FrameReader<ReadHalf<S>>, FrameWriter<WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        (
            FrameReader {
                stream: r,
                read: self.read,
            },
            FrameWriter {
                stream: w,
                write: self.write,
            },
        )
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream underneath, to write bytes that are not a whole frame (tests of what a
    /// peer does with a broken one).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

/// The reading half of a split [`Connection`].
#[derive(Debug)]
pub struct FrameReader<R> {
    stream: R,
    read: ReadState,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// See [`Connection::read_frame`].
    pub async fn read_frame(&mut self) -> Result<Option<Message>, WireError> {
        self.read.read_frame(&mut self.stream).await
    }
}

/// The writing half of a split [`Connection`].
#[derive(Debug)]
pub struct FrameWriter<W> {
    stream: W,
    write: WriteState,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// See [`Connection::write_frame`].
    pub async fn write_frame(&mut self, msg: &Message) -> Result<(), WireError> {
        self.write.write_frame(&mut self.stream, msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DEFAULT_MAX_PAYLOAD;
    use crate::message::{Ping, Pong};
    use tokio::io::{duplex, AsyncWriteExt};

    #[tokio::test]
    async fn frames_split_across_reads_are_reassembled() {
        let (client, server) = duplex(64);
        let mut reader = Connection::from_stream(server, Limits::default());
        let frames: Vec<u8> = (0..10u64)
            .flat_map(|n| Message::Ping(Ping { nonce: n }).to_frame().unwrap())
            .collect();
        let writer = tokio::spawn(async move {
            let mut client = client;
            // One byte at a time: every read sees an incomplete frame first.
            for b in frames {
                client.write_all(&[b]).await.unwrap();
            }
        });
        for n in 0..10u64 {
            assert_eq!(
                reader.read_frame().await.unwrap(),
                Some(Message::Ping(Ping { nonce: n }))
            );
        }
        writer.await.unwrap();
        assert_eq!(
            reader.read_frame().await.unwrap(),
            None,
            "clean close between frames"
        );
    }

    #[tokio::test]
    async fn a_4_gib_header_is_refused_without_allocating() {
        let (mut client, server) = duplex(64);
        let mut conn = Connection::from_stream(server, Limits::default());
        let mut header = Message::Ping(Ping { nonce: 0 }).to_frame().unwrap();
        header.truncate(HEADER_LEN);
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        client.write_all(&header).await.unwrap();
        // The client stays open: the header alone must decide (a timeout here means the reader
        // was waiting for the 4 GiB).
        let err = tokio::time::timeout(Duration::from_secs(5), conn.read_frame())
            .await
            .expect("refused on the header alone")
            .unwrap_err();
        assert!(
            matches!(
                err,
                WireError::FrameTooLarge {
                    len: 0xFFFF_FFFF,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            conn.read.buffer.capacity() <= 2 * MIN_READ,
            "{}",
            conn.read.buffer.capacity()
        );
    }

    #[tokio::test]
    async fn memory_follows_received_bytes_not_announced_length() {
        let (mut client, server) = duplex(1 << 16);
        let mut conn = Connection::from_stream(server, Limits::default());
        let mut frame = Message::Ping(Ping { nonce: 0 }).to_frame().unwrap();
        frame.truncate(HEADER_LEN);
        // A legal length (exactly the limit), but only 100 payload bytes ever arrive.
        frame[8..12].copy_from_slice(&DEFAULT_MAX_PAYLOAD.to_le_bytes());
        frame.extend_from_slice(&[0; 100]);
        client.write_all(&frame).await.unwrap();
        drop(client);
        let err = conn.read_frame().await.unwrap_err();
        assert!(
            matches!(err, WireError::ClosedMidFrame { buffered: 112 }),
            "{err}"
        );
        assert!(
            conn.read.buffer.capacity() <= 2 * READ_CHUNK,
            "{}",
            conn.read.buffer.capacity()
        );
    }

    #[tokio::test]
    async fn invalid_messages_are_not_written() {
        let (client, _server) = duplex(64);
        let mut conn = Connection::from_stream(client, Limits { max_payload: 4 });
        let err = conn
            .write_frame(&Message::Pong(Pong { nonce: 1 }))
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { len: 8, max: 4 }));
    }

    #[tokio::test]
    async fn split_halves_work_together() {
        let (a, b) = duplex(1024);
        let (mut ra, mut wa) = Connection::from_stream(a, Limits::default()).into_split();
        let mut b = Connection::from_stream(b, Limits::default());
        wa.write_frame(&Message::Ping(Ping { nonce: 5 }))
            .await
            .unwrap();
        let Some(Message::Ping(p)) = b.read_frame().await.unwrap() else {
            panic!("no ping")
        };
        b.write_frame(&Message::Pong(Pong { nonce: p.nonce }))
            .await
            .unwrap();
        assert_eq!(
            ra.read_frame().await.unwrap(),
            Some(Message::Pong(Pong { nonce: 5 }))
        );
    }

    #[tokio::test]
    async fn close_with_error_tells_the_peer() {
        let (a, b) = duplex(1024);
        let conn = Connection::from_stream(a, Limits::default());
        let mut peer = Connection::from_stream(b, Limits::default());
        let err = WireError::UnsupportedVersion {
            found: 9,
            supported: &[1],
        };
        conn.close_with_error(&err).await;
        let Some(Message::Error(e)) = peer.read_frame().await.unwrap() else {
            panic!("no error frame")
        };
        assert_eq!(e.code, crate::message::ErrorCode::UNSUPPORTED_VERSION);
        assert!(e.message.contains("version 9"), "{}", e.message);
        assert_eq!(peer.read_frame().await.unwrap(), None);
    }
}
