//! Wire protocol of the example workload: one framing, spoken over a TCP connection and over one
//! QUIC bidirectional stream alike.
//!
//! All integers are big-endian.
//!
//! Request (header [`REQUEST_HEADER_LEN`] = 17 bytes):
//!
//! ```text
//! magic u32 = 0x54515251 ("TQRQ") | seq u64 | kind u8 | len u32 | payload[len]
//! ```
//!
//! Reply (header [`REPLY_HEADER_LEN`] = 34 bytes):
//!
//! ```text
//! magic u32 = 0x54515250 ("TQRP") | seq u64 | received u64 | kind u8 | status u8 | digest u64
//!   | len u32 | payload[len]
//! ```
//!
//! * `kind`: [`Kind::Echo`] (0) or [`Kind::VerifyState`] (1).
//! * `seq`: the first request of a connection carries 0, each following one the previous plus 1.
//!   The server rejects any other value with [`Status::SequenceError`] and closes the connection.
//! * `received`: total request payload bytes the server has accepted on this connection so far,
//!   including the request being answered.
//! * `status`: [`Status::Ok`] (0), [`Status::StateVerifyFailed`] (1), or
//!   [`Status::SequenceError`] (2, followed by the server closing the connection).
//! * `digest`: the state digest for a successful [`Kind::VerifyState`], else 0.
//! * payload of an echo reply: the request payload with every byte XOR [`ECHO_XOR`], so that a
//!   reply can never be a reflected copy of the request. A verify reply's payload is empty when
//!   the state is intact and a UTF-8 description of the damage otherwise; a sequence error's is a
//!   UTF-8 description.
//! * `len` is at most [`MAX_PAYLOAD`] (64 KiB) in both directions; more is a protocol error.
//!
//! Encoders and decoders are pure functions over byte buffers. The decoders are incremental: given
//! a prefix of a frame they answer `Ok(None)` ("need more input") and they reject a bad magic,
//! kind, status or length as soon as the bytes that carry it are present, so a peer speaking
//! garbage is detected without waiting for (or buffering) more than one bounded frame.

use thiserror::Error;

/// Magic number that opens every request: "TQRQ".
pub const REQUEST_MAGIC: u32 = 0x5451_5251;
/// Magic number that opens every reply: "TQRP".
pub const REPLY_MAGIC: u32 = 0x5451_5250;
/// Largest payload a request or reply may carry (64 KiB, inclusive).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Size of a request header: magic, seq, kind, len.
pub const REQUEST_HEADER_LEN: usize = 4 + 8 + 1 + 4;
/// Size of a reply header: magic, seq, received, kind, status, digest, len.
pub const REPLY_HEADER_LEN: usize = 4 + 8 + 8 + 1 + 1 + 8 + 4;
/// Largest encoded request.
pub const MAX_REQUEST_LEN: usize = REQUEST_HEADER_LEN + MAX_PAYLOAD;
/// Largest encoded reply.
pub const MAX_REPLY_LEN: usize = REPLY_HEADER_LEN + MAX_PAYLOAD;
/// Every byte of an echo reply's payload is the request's byte XOR this value.
pub const ECHO_XOR: u8 = 0x5A;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Echo the payload back, transformed with [`ECHO_XOR`].
    Echo,
    /// Verify the service's memory state and answer with its digest.
    VerifyState,
}

impl Kind {
    /// The byte that carries this kind on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::Echo => 0,
            Kind::VerifyState => 1,
        }
    }

    /// Parses a wire byte.
    pub fn from_byte(b: u8) -> Result<Self, ProtocolError> {
        match b {
            0 => Ok(Kind::Echo),
            1 => Ok(Kind::VerifyState),
            other => Err(ProtocolError::UnknownKind(other)),
        }
    }
}

/// Outcome carried by a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The request was served.
    Ok,
    /// A [`Kind::VerifyState`] request found the state damaged; the payload describes how.
    StateVerifyFailed,
    /// The request's sequence number was not the expected one; the server closes the connection.
    SequenceError,
}

impl Status {
    /// The byte that carries this status on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::StateVerifyFailed => 1,
            Status::SequenceError => 2,
        }
    }

    /// Parses a wire byte.
    pub fn from_byte(b: u8) -> Result<Self, ProtocolError> {
        match b {
            0 => Ok(Status::Ok),
            1 => Ok(Status::StateVerifyFailed),
            2 => Ok(Status::SequenceError),
            other => Err(ProtocolError::UnknownStatus(other)),
        }
    }
}

/// A malformed frame. The stream cannot be resynchronised after one: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// The frame does not start with the expected magic number (or a prefix of it).
    #[error("bad magic: expected {expected:#010x}, got bytes {found:02x?}")]
    BadMagic {
        /// The magic number that was expected.
        expected: u32,
        /// The bytes found where the magic number should be (up to 4).
        found: Vec<u8>,
    },
    /// A payload longer than [`MAX_PAYLOAD`].
    #[error("payload length {len} exceeds the maximum of {MAX_PAYLOAD} bytes")]
    PayloadTooLong {
        /// The announced (or attempted) length.
        len: u64,
    },
    /// An unknown request kind byte.
    #[error("unknown kind {0}")]
    UnknownKind(u8),
    /// An unknown reply status byte.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
}

/// A request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Sequence number: 0 for a connection's first request, then +1 each.
    pub seq: u64,
    /// What is asked for.
    pub kind: Kind,
    /// Payload (at most [`MAX_PAYLOAD`] bytes).
    pub payload: Vec<u8>,
}

/// A reply frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Sequence number of the request being answered.
    pub seq: u64,
    /// Request payload bytes the server has accepted on this connection, this request included.
    pub received: u64,
    /// Kind of the request being answered.
    pub kind: Kind,
    /// Outcome.
    pub status: Status,
    /// State digest for a successful [`Kind::VerifyState`], else 0.
    pub digest: u64,
    /// Payload (at most [`MAX_PAYLOAD`] bytes).
    pub payload: Vec<u8>,
}

fn check_len(len: usize) -> Result<u32, ProtocolError> {
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::PayloadTooLong { len: len as u64 });
    }
    // MAX_PAYLOAD fits in u32, so this cannot fail after the check above.
    u32::try_from(len).map_err(|_| ProtocolError::PayloadTooLong { len: len as u64 })
}

/// Appends the encoding of `req` to `out`. Fails (leaving `out` untouched) if the payload is too
/// long.
pub fn encode_request(req: &Request, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let len = check_len(req.payload.len())?;
    out.reserve(REQUEST_HEADER_LEN + req.payload.len());
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&req.seq.to_be_bytes());
    out.push(req.kind.to_byte());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&req.payload);
    Ok(())
}

/// Appends the encoding of `reply` to `out`. Fails (leaving `out` untouched) if the payload is too
/// long.
pub fn encode_reply(reply: &Reply, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let len = check_len(reply.payload.len())?;
    out.reserve(REPLY_HEADER_LEN + reply.payload.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&reply.seq.to_be_bytes());
    out.extend_from_slice(&reply.received.to_be_bytes());
    out.push(reply.kind.to_byte());
    out.push(reply.status.to_byte());
    out.extend_from_slice(&reply.digest.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&reply.payload);
    Ok(())
}

/// Checks the (possibly partial) magic at the start of `buf`.
fn check_magic(buf: &[u8], expected: u32) -> Result<(), ProtocolError> {
    let want = expected.to_be_bytes();
    let n = buf.len().min(4);
    if buf[..n] != want[..n] {
        return Err(ProtocolError::BadMagic {
            expected,
            found: buf[..n].to_vec(),
        });
    }
    Ok(())
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn payload_len(raw: u32) -> Result<usize, ProtocolError> {
    let len = raw as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::PayloadTooLong { len: raw.into() });
    }
    Ok(len)
}

/// Decodes one request from the start of `buf`.
///
/// Returns `Ok(Some((request, consumed)))` for a complete frame of `consumed` bytes, `Ok(None)` if
/// `buf` holds only a valid prefix of a frame (read more and call again), or an error as soon as
/// the bytes present prove the frame malformed.
pub fn decode_request(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtocolError> {
    check_magic(buf, REQUEST_MAGIC)?;
    // kind at 12, len at 13..17
    if buf.len() > 12 {
        Kind::from_byte(buf[12])?;
    }
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let seq = be_u64(buf, 4);
    let kind = Kind::from_byte(buf[12])?;
    let len = payload_len(be_u32(buf, 13))?;
    let total = REQUEST_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = buf[REQUEST_HEADER_LEN..total].to_vec();
    Ok(Some((Request { seq, kind, payload }, total)))
}

/// Decodes one reply from the start of `buf`; same contract as [`decode_request`].
pub fn decode_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    check_magic(buf, REPLY_MAGIC)?;
    // kind at 20, status at 21, digest at 22..30, len at 30..34
    if buf.len() > 20 {
        Kind::from_byte(buf[20])?;
    }
    if buf.len() > 21 {
        Status::from_byte(buf[21])?;
    }
    if buf.len() < REPLY_HEADER_LEN {
        return Ok(None);
    }
    let seq = be_u64(buf, 4);
    let received = be_u64(buf, 12);
    let kind = Kind::from_byte(buf[20])?;
    let status = Status::from_byte(buf[21])?;
    let digest = be_u64(buf, 22);
    let len = payload_len(be_u32(buf, 30))?;
    let total = REPLY_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = buf[REPLY_HEADER_LEN..total].to_vec();
    Ok(Some((
        Reply {
            seq,
            received,
            kind,
            status,
            digest,
            payload,
        },
        total,
    )))
}

/// The echo transform: every byte XOR [`ECHO_XOR`].
pub fn echo_transform(payload: &[u8]) -> Vec<u8> {
    payload.iter().map(|b| b ^ ECHO_XOR).collect()
}

/// Truncates a description to fit in a payload, on a character boundary.
fn message_payload(msg: &str) -> Vec<u8> {
    let mut end = msg.len().min(MAX_PAYLOAD);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.as_bytes()[..end].to_vec()
}

/// A request whose sequence number is not the one the server expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("sequence error: expected seq {expected}, got {got}")]
pub struct SequenceError {
    /// The sequence number expected.
    pub expected: u64,
    /// The sequence number received.
    pub got: u64,
}

/// Per-connection protocol state of the server side.
#[derive(Debug, Clone, Default)]
pub struct ServerConn {
    next_seq: u64,
    received: u64,
}

impl ServerConn {
    /// State of a fresh connection: expects seq 0, has received nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sequence number the next request must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Request payload bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Accounts for `req`. On success returns the `received` value its reply must carry; on a
    /// sequence error the state is left unchanged (answer with [`Reply::sequence_error`], then
    /// close).
    pub fn accept(&mut self, req: &Request) -> Result<u64, SequenceError> {
        if req.seq != self.next_seq {
            return Err(SequenceError {
                expected: self.next_seq,
                got: req.seq,
            });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        self.received = self.received.wrapping_add(req.payload.len() as u64);
        Ok(self.received)
    }
}

impl Reply {
    /// The reply to an accepted echo request.
    pub fn echo(req: &Request, received: u64) -> Reply {
        Reply {
            seq: req.seq,
            received,
            kind: Kind::Echo,
            status: Status::Ok,
            digest: 0,
            payload: echo_transform(&req.payload),
        }
    }

    /// The reply to an accepted verify request, given the verification's outcome (the digest, or
    /// a description of the damage).
    pub fn verify(seq: u64, received: u64, outcome: Result<u64, &str>) -> Reply {
        match outcome {
            Ok(digest) => Reply {
                seq,
                received,
                kind: Kind::VerifyState,
                status: Status::Ok,
                digest,
                payload: Vec::new(),
            },
            Err(msg) => Reply {
                seq,
                received,
                kind: Kind::VerifyState,
                status: Status::StateVerifyFailed,
                digest: 0,
                payload: message_payload(msg),
            },
        }
    }

    /// The reply to a rejected request; `received` is the server's count before it.
    pub fn sequence_error(req: &Request, received: u64, err: &SequenceError) -> Reply {
        Reply {
            seq: req.seq,
            received,
            kind: req.kind,
            status: Status::SequenceError,
            digest: 0,
            payload: message_payload(&err.to_string()),
        }
    }
}

/// A reply that does not match the request it answers: the client has detected a lost,
/// duplicated, reordered or corrupted byte, or a server-side error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyMismatch {
    /// The reply answers another request.
    #[error("reply seq {got}, expected {expected}")]
    Seq {
        /// Sequence number of the outstanding request.
        expected: u64,
        /// Sequence number in the reply.
        got: u64,
    },
    /// The server's byte count differs from the client's.
    #[error("server received {got} payload bytes, client sent {expected}")]
    Received {
        /// Bytes the client has sent.
        expected: u64,
        /// Bytes the server says it has received.
        got: u64,
    },
    /// The reply's kind differs from the request's.
    #[error("reply kind {got:?}, expected {expected:?}")]
    Kind {
        /// Kind of the request.
        expected: Kind,
        /// Kind in the reply.
        got: Kind,
    },
    /// The server rejected the request's sequence number.
    #[error("server reported a sequence error: {0}")]
    ServerSequenceError(String),
    /// An echo reply with a status other than [`Status::Ok`].
    #[error("echo reply with status {0:?}")]
    EchoStatus(Status),
    /// An echo reply with a non-zero digest.
    #[error("echo reply with non-zero digest {0:#x}")]
    EchoDigest(u64),
    /// An echo reply whose payload length differs from the request's.
    #[error("echo payload length {got}, expected {expected}")]
    PayloadLen {
        /// Length of the request payload.
        expected: usize,
        /// Length of the reply payload.
        got: usize,
    },
    /// An echo reply whose payload differs from the transformed request payload.
    #[error("echo payload corrupt at offset {offset}: got {got:#04x}, expected {expected:#04x}")]
    PayloadCorrupt {
        /// Offset of the first wrong byte.
        offset: usize,
        /// Expected byte.
        expected: u8,
        /// Byte received.
        got: u8,
    },
}

/// What a reply that matched its request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// An echo whose payload (this many bytes) was verified.
    Echo {
        /// Payload bytes verified.
        bytes: usize,
    },
    /// The server's state verified intact.
    StateOk {
        /// The state digest.
        digest: u64,
    },
    /// The server's state verification failed.
    StateFailed {
        /// The server's description of the damage.
        message: String,
    },
}

/// Per-connection protocol state of the client side, for a closed loop (one request outstanding
/// at a time).
#[derive(Debug, Clone, Default)]
pub struct ClientConn {
    next_seq: u64,
    sent: u64,
}

impl ClientConn {
    /// State of a fresh connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests built so far (= the next sequence number).
    pub fn requests(&self) -> u64 {
        self.next_seq
    }

    /// Payload bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Builds the next request and accounts for its payload.
    pub fn next_request(&mut self, kind: Kind, payload: Vec<u8>) -> Request {
        let req = Request {
            seq: self.next_seq,
            kind,
            payload,
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        self.sent = self.sent.wrapping_add(req.payload.len() as u64);
        req
    }

    /// Checks `reply` against `req`, which must be the last request built by
    /// [`next_request`](Self::next_request) (closed loop: the expected `received` count is the
    /// total sent so far).
    pub fn check_reply(&self, req: &Request, reply: &Reply) -> Result<ReplyOutcome, ReplyMismatch> {
        if reply.status == Status::SequenceError {
            return Err(ReplyMismatch::ServerSequenceError(
                String::from_utf8_lossy(&reply.payload).into_owned(),
            ));
        }
        if reply.seq != req.seq {
            return Err(ReplyMismatch::Seq {
                expected: req.seq,
                got: reply.seq,
            });
        }
        if reply.kind != req.kind {
            return Err(ReplyMismatch::Kind {
                expected: req.kind,
                got: reply.kind,
            });
        }
        if reply.received != self.sent {
            return Err(ReplyMismatch::Received {
                expected: self.sent,
                got: reply.received,
            });
        }
        match req.kind {
            Kind::Echo => {
                if reply.status != Status::Ok {
                    return Err(ReplyMismatch::EchoStatus(reply.status));
                }
                if reply.digest != 0 {
                    return Err(ReplyMismatch::EchoDigest(reply.digest));
                }
                if reply.payload.len() != req.payload.len() {
                    return Err(ReplyMismatch::PayloadLen {
                        expected: req.payload.len(),
                        got: reply.payload.len(),
                    });
                }
                if let Some((offset, (&sent, &got))) = req
                    .payload
                    .iter()
                    .zip(reply.payload.iter())
                    .enumerate()
                    .find(|(_, (&s, &g))| s ^ ECHO_XOR != g)
                {
                    return Err(ReplyMismatch::PayloadCorrupt {
                        offset,
                        expected: sent ^ ECHO_XOR,
                        got,
                    });
                }
                Ok(ReplyOutcome::Echo {
                    bytes: reply.payload.len(),
                })
            }
            Kind::VerifyState => match reply.status {
                Status::Ok => Ok(ReplyOutcome::StateOk {
                    digest: reply.digest,
                }),
                // SequenceError was handled above; treat any other status as a failure report.
                _ => Ok(ReplyOutcome::StateFailed {
                    message: String::from_utf8_lossy(&reply.payload).into_owned(),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn req(seq: u64, kind: Kind, payload: &[u8]) -> Request {
        Request {
            seq,
            kind,
            payload: payload.to_vec(),
        }
    }

    fn enc_req(r: &Request) -> Vec<u8> {
        let mut v = Vec::new();
        encode_request(r, &mut v).unwrap();
        v
    }

    fn enc_reply(r: &Reply) -> Vec<u8> {
        let mut v = Vec::new();
        encode_reply(r, &mut v).unwrap();
        v
    }

    #[test]
    fn request_layout_is_exact() {
        let bytes = enc_req(&req(0x0102_0304_0506_0708, Kind::VerifyState, b"ab"));
        assert_eq!(
            bytes,
            [
                0x54, 0x51, 0x52, 0x51, // magic "TQRQ"
                1, 2, 3, 4, 5, 6, 7, 8, // seq
                1, // kind
                0, 0, 0, 2, // len
                b'a', b'b'
            ]
        );
        assert_eq!(&bytes[..4], b"TQRQ");
    }

    #[test]
    fn reply_layout_is_exact() {
        let r = Reply {
            seq: 7,
            received: 0x1122,
            kind: Kind::Echo,
            status: Status::StateVerifyFailed,
            digest: 0xAABB,
            payload: vec![9],
        };
        let bytes = enc_reply(&r);
        let mut want = Vec::new();
        want.extend_from_slice(b"TQRP");
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&0x1122u64.to_be_bytes());
        want.push(0);
        want.push(1);
        want.extend_from_slice(&0xAABBu64.to_be_bytes());
        want.extend_from_slice(&1u32.to_be_bytes());
        want.push(9);
        assert_eq!(bytes, want);
        assert_eq!(bytes.len(), REPLY_HEADER_LEN + 1);
    }

    #[test]
    fn request_roundtrip_and_every_prefix_needs_more() {
        let r = req(42, Kind::Echo, &[1, 2, 3, 4, 5]);
        let bytes = enc_req(&r);
        for cut in 0..bytes.len() {
            assert_eq!(decode_request(&bytes[..cut]).unwrap(), None, "prefix {cut}");
        }
        let (got, n) = decode_request(&bytes).unwrap().unwrap();
        assert_eq!(got, r);
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn reply_roundtrip_and_every_prefix_needs_more() {
        let r = Reply {
            seq: u64::MAX,
            received: 3,
            kind: Kind::VerifyState,
            status: Status::Ok,
            digest: 0xDEAD_BEEF,
            payload: vec![],
        };
        let bytes = enc_reply(&r);
        for cut in 0..bytes.len() {
            assert_eq!(decode_reply(&bytes[..cut]).unwrap(), None, "prefix {cut}");
        }
        let (got, n) = decode_reply(&bytes).unwrap().unwrap();
        assert_eq!(got, r);
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn decodes_back_to_back_frames() {
        let a = req(0, Kind::Echo, b"hello");
        let b = req(1, Kind::VerifyState, b"");
        let mut bytes = enc_req(&a);
        bytes.extend(enc_req(&b));
        bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes()[..2]);
        let (got_a, n) = decode_request(&bytes).unwrap().unwrap();
        assert_eq!(got_a, a);
        let (got_b, m) = decode_request(&bytes[n..]).unwrap().unwrap();
        assert_eq!(got_b, b);
        assert_eq!(decode_request(&bytes[n + m..]).unwrap(), None);
    }

    #[test]
    fn max_payload_is_accepted_and_one_more_is_rejected() {
        let r = req(0, Kind::Echo, &vec![0xEE; MAX_PAYLOAD]);
        let bytes = enc_req(&r);
        assert_eq!(bytes.len(), MAX_REQUEST_LEN);
        assert_eq!(decode_request(&bytes).unwrap().unwrap().0, r);

        let too_long = req(0, Kind::Echo, &vec![0; MAX_PAYLOAD + 1]);
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode_request(&too_long, &mut out),
            Err(ProtocolError::PayloadTooLong { .. })
        ));
        assert_eq!(out, [1, 2, 3], "failed encode leaves the buffer untouched");
        let too_long_reply = Reply::echo(&too_long, 0);
        assert!(encode_reply(&too_long_reply, &mut out).is_err());
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        let mut h = Vec::new();
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes());
        h.push(0);
        h.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert_eq!(
            decode_request(&h),
            Err(ProtocolError::PayloadTooLong {
                len: MAX_PAYLOAD as u64 + 1
            })
        );
        h[13..17].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_request(&h).is_err());

        let mut r = enc_reply(&Reply::verify(0, 0, Ok(1)));
        r[30..34].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_reply(&r[..REPLY_HEADER_LEN]),
            Err(ProtocolError::PayloadTooLong { .. })
        ));
    }

    #[test]
    fn bad_magic_is_rejected_early() {
        assert!(matches!(
            decode_request(b"X"),
            Err(ProtocolError::BadMagic { .. })
        ));
        assert!(decode_request(b"TQ").unwrap().is_none());
        assert!(decode_request(b"TQRP").is_err(), "a reply is not a request");
        assert!(decode_reply(b"TQRQ").is_err(), "a request is not a reply");
        let bytes = enc_req(&req(1, Kind::Echo, b"x"));
        let mut bad = bytes.clone();
        bad[3] ^= 1;
        assert!(decode_request(&bad).is_err());
        let garbage = [0u8; 64];
        assert!(decode_reply(&garbage).is_err());
    }

    #[test]
    fn unknown_kind_and_status_are_rejected() {
        let mut bytes = enc_req(&req(1, Kind::Echo, b"x"));
        bytes[12] = 7;
        assert_eq!(
            decode_request(&bytes[..13]),
            Err(ProtocolError::UnknownKind(7))
        );
        let mut r = enc_reply(&Reply::echo(&req(1, Kind::Echo, b"x"), 1));
        r[21] = 9;
        assert_eq!(decode_reply(&r[..22]), Err(ProtocolError::UnknownStatus(9)));
        r[20] = 3;
        assert_eq!(decode_reply(&r), Err(ProtocolError::UnknownKind(3)));
    }

    #[test]
    fn echo_transform_is_not_identity_and_inverts() {
        let p: Vec<u8> = (0..=255).collect();
        let t = echo_transform(&p);
        assert!(p.iter().zip(&t).all(|(a, b)| a != b));
        assert_eq!(echo_transform(&t), p);
    }

    #[test]
    fn server_tracks_seq_and_received() {
        let mut s = ServerConn::new();
        assert_eq!(s.accept(&req(0, Kind::Echo, b"abc")).unwrap(), 3);
        assert_eq!(s.accept(&req(1, Kind::VerifyState, b"")).unwrap(), 3);
        assert_eq!(s.accept(&req(2, Kind::Echo, b"de")).unwrap(), 5);
        // duplicate, skipped and reordered seqs
        for bad in [2, 4, 0] {
            let r = req(bad, Kind::Echo, b"zz");
            let e = s.accept(&r).unwrap_err();
            assert_eq!(
                e,
                SequenceError {
                    expected: 3,
                    got: bad
                }
            );
            let reply = Reply::sequence_error(&r, s.received(), &e);
            assert_eq!(reply.status, Status::SequenceError);
        }
        assert_eq!(s.next_seq(), 3);
        assert_eq!(s.received(), 5);
    }

    #[test]
    fn client_accepts_a_correct_exchange() {
        let mut c = ClientConn::new();
        let mut s = ServerConn::new();
        for i in 0..10u8 {
            let r = c.next_request(Kind::Echo, vec![i; i as usize]);
            let received = s.accept(&r).unwrap();
            let reply = Reply::echo(&r, received);
            let bytes = enc_reply(&reply);
            let (decoded, _) = decode_reply(&bytes).unwrap().unwrap();
            assert_eq!(
                c.check_reply(&r, &decoded).unwrap(),
                ReplyOutcome::Echo { bytes: i as usize }
            );
        }
        let r = c.next_request(Kind::VerifyState, vec![]);
        let received = s.accept(&r).unwrap();
        assert_eq!(
            c.check_reply(&r, &Reply::verify(r.seq, received, Ok(99)))
                .unwrap(),
            ReplyOutcome::StateOk { digest: 99 }
        );
        let r = c.next_request(Kind::VerifyState, vec![]);
        let received = s.accept(&r).unwrap();
        assert_eq!(
            c.check_reply(&r, &Reply::verify(r.seq, received, Err("page 3 bad")))
                .unwrap(),
            ReplyOutcome::StateFailed {
                message: "page 3 bad".into()
            }
        );
        assert_eq!(c.requests(), 12);
        assert_eq!(c.sent(), 45);
    }

    #[test]
    fn client_detects_every_kind_of_mismatch() {
        let mut c = ClientConn::new();
        let r = c.next_request(Kind::Echo, b"payload".to_vec());
        let good = Reply::echo(&r, 7);
        assert!(c.check_reply(&r, &good).is_ok());

        let mut bad = good.clone();
        bad.seq = 1;
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::Seq { .. })
        ));

        let mut bad = good.clone();
        bad.received = 6; // a lost byte
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::Received { .. })
        ));

        let mut bad = good.clone();
        bad.received = 14; // a duplicated request
        assert!(c.check_reply(&r, &bad).is_err());

        let mut bad = good.clone();
        bad.payload[3] ^= 0x01;
        assert_eq!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::PayloadCorrupt {
                offset: 3,
                expected: b'l' ^ ECHO_XOR,
                got: b'l' ^ ECHO_XOR ^ 1
            })
        );

        let mut bad = good.clone();
        bad.payload = r.payload.clone(); // reflected copy
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::PayloadCorrupt { offset: 0, .. })
        ));

        let mut bad = good.clone();
        bad.payload.pop();
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::PayloadLen { .. })
        ));

        let mut bad = good.clone();
        bad.kind = Kind::VerifyState;
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::Kind { .. })
        ));

        let mut bad = good.clone();
        bad.digest = 5;
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::EchoDigest(5))
        ));

        let mut bad = good.clone();
        bad.status = Status::StateVerifyFailed;
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::EchoStatus(_))
        ));

        let e = SequenceError {
            expected: 0,
            got: 0,
        };
        let bad = Reply::sequence_error(&r, 0, &e);
        assert!(matches!(
            c.check_reply(&r, &bad),
            Err(ReplyMismatch::ServerSequenceError(_))
        ));
    }

    #[test]
    fn long_failure_messages_are_truncated_on_a_char_boundary() {
        let msg = "é".repeat(MAX_PAYLOAD); // 2 bytes each
        let reply = Reply::verify(0, 0, Err(&msg));
        assert!(reply.payload.len() <= MAX_PAYLOAD);
        assert!(std::str::from_utf8(&reply.payload).is_ok());
        assert!(encode_reply(&reply, &mut Vec::new()).is_ok());
    }
}
