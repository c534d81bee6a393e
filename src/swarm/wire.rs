//! The BEP 3 wire format: handshakes, and messages decoded once, as they
//! come off the wire, into checked types: a [`PieceIndex`] is below the
//! torrent's piece count and a [`Block`] lies inside its piece, so nothing
//! past the decoder checks bounds or does arithmetic that can overflow.

use std::fmt;

use librqbit_peer_protocol::{Handshake, Message as RqMessage, Request};

use super::PeerId;
use super::picker::Bits;

/// Bytes per request (the size every client uses).
pub const BLOCK: u32 = 16 << 10;
/// Largest block a peer may ask for or send.
pub const MAX_REQUEST: u32 = 128 << 10;
pub const HANDSHAKE_LEN: usize = 68;
/// Our own message, sent only to other blockswarm hosts: "I am fetching
/// this piece from the origin", so that they leave it to us there. Other
/// clients skip ids they do not know.
pub const CLAIM_ID: u8 = 0xB5;
/// Length prefix, id, index and begin of a piece message: its block starts
/// here in the frame.
pub const PIECE_HEADER: usize = 13;

/// A torrent's piece geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    total: u64,
    piece_len: u32,
    count: u32,
}

impl Lengths {
    /// `None` unless the pieces are 1 byte to 4 GiB and at most 2^32 of them.
    pub fn new(total: u64, piece_len: u64) -> Option<Self> {
        let piece_len = u32::try_from(piece_len).ok().filter(|&p| p > 0)?;
        let count = u32::try_from(total.div_ceil(u64::from(piece_len))).ok()?;
        Some(Self {
            total,
            piece_len,
            count,
        })
    }

    pub fn count(&self) -> usize {
        self.count as usize
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn piece_len(&self) -> u32 {
        self.piece_len
    }

    /// The only way to a [`PieceIndex`].
    pub fn piece(&self, index: u32) -> Option<PieceIndex> {
        (index < self.count).then_some(PieceIndex(index))
    }

    /// [`Lengths::piece`] for indexes this side computed (the picker's).
    pub fn piece_at(&self, index: usize) -> Option<PieceIndex> {
        self.piece(u32::try_from(index).ok()?)
    }

    pub fn offset(&self, p: PieceIndex) -> u64 {
        u64::from(p.0) * u64::from(self.piece_len)
    }

    pub fn size(&self, p: PieceIndex) -> u32 {
        // The last piece is shorter; every piece fits in a u32.
        (self.total - self.offset(p)).min(u64::from(self.piece_len)) as u32
    }

    /// A block of 1 to [`MAX_REQUEST`] bytes inside piece `p`.
    pub fn block(&self, p: PieceIndex, begin: u32, len: u32) -> Option<Block> {
        let end = u64::from(begin) + u64::from(len);
        (len > 0 && len <= MAX_REQUEST && end <= u64::from(self.size(p))).then_some(Block {
            piece: p,
            begin,
            len,
        })
    }

    pub fn bitfield_len(&self) -> usize {
        self.count().div_ceil(8)
    }

    /// The longest frame a peer may send (a bitfield or a block).
    pub fn max_frame(&self) -> usize {
        4 + 1 + self.bitfield_len().max(8 + MAX_REQUEST as usize)
    }
}

/// A piece index below the torrent's piece count (see [`Lengths::piece`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PieceIndex(u32);

impl PieceIndex {
    pub fn get(self) -> usize {
        self.0 as usize
    }

    pub fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PieceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Bytes `begin..begin + len` of a piece, inside it (see [`Lengths::block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    piece: PieceIndex,
    begin: u32,
    len: u32,
}

impl Block {
    pub fn piece(&self) -> PieceIndex {
        self.piece
    }

    pub fn begin(&self) -> u32 {
        self.begin
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    /// Never true: a block holds one byte at least.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it ends in its piece (no overflow: it lies inside the piece).
    pub fn end(&self) -> u32 {
        self.begin + self.len
    }

    fn request(&self) -> Request {
        Request::new(self.piece.0, self.begin, self.len)
    }
}

/// A message from a peer, checked against the torrent.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    KeepAlive,
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    Have(PieceIndex),
    Bitfield(Bits),
    Request(Block),
    Cancel(Block),
    /// The block's bytes are the frame's from [`PIECE_HEADER`] on.
    Piece(Block),
    /// See [`CLAIM_ID`].
    Claim(PieceIndex),
    /// An id outside BEP 3 (an extension we never announced): skipped.
    Other(u8),
}

/// Why a frame is refused; the peer that sent it is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a frame of {got} bytes whose length prefix says {said} follow")]
    Length { said: u64, got: usize },
    #[error("message {id}: {why}")]
    Malformed { id: u8, why: String },
    #[error("{what} of piece {index}, but the torrent has {count} pieces")]
    Index {
        what: &'static str,
        index: u32,
        count: usize,
    },
    #[error("{what} of bytes {begin}+{len} of piece {index}, which has {size}")]
    Block {
        what: &'static str,
        index: u32,
        begin: u32,
        len: u64,
        size: u32,
    },
    #[error("bitfield of {got} bytes for {count} pieces ({want} bytes)")]
    BitfieldLength {
        got: usize,
        want: usize,
        count: usize,
    },
    #[error("bitfield with bits set past the last piece")]
    SpareBits,
}

/// Decodes one whole frame (its 4-byte length prefix included) into a
/// checked message. Pure: no I/O, no panic on any input.
pub fn decode(frame: &[u8], l: &Lengths) -> Result<Message, WireError> {
    let Some((prefix, body)) = frame.split_first_chunk::<4>() else {
        return Err(WireError::Length {
            said: 0,
            got: frame.len(),
        });
    };
    let said = u32::from_be_bytes(*prefix);
    if said as usize != body.len() {
        return Err(WireError::Length {
            said: u64::from(said),
            got: body.len(),
        });
    }
    let Some((&id, rest)) = body.split_first() else {
        return Ok(Message::KeepAlive);
    };
    let piece = |what, index: u32| {
        l.piece(index).ok_or(WireError::Index {
            what,
            index,
            count: l.count(),
        })
    };
    let block = |what, index: u32, begin: u32, len: u64| {
        let p = piece(what, index)?;
        u32::try_from(len)
            .ok()
            .and_then(|len| l.block(p, begin, len))
            .ok_or(WireError::Block {
                what,
                index,
                begin,
                len,
                size: l.size(p),
            })
    };
    match id {
        CLAIM_ID => {
            let i = <[u8; 4]>::try_from(rest).map_err(|_| WireError::Malformed {
                id,
                why: format!("a claim of {} bytes", rest.len()),
            })?;
            return Ok(Message::Claim(piece("claim", u32::from_be_bytes(i))?));
        }
        9.. => return Ok(Message::Other(id)),
        _ => {}
    }
    let (m, _) = RqMessage::deserialize(frame, &[]).map_err(|e| WireError::Malformed {
        id,
        why: e.to_string(),
    })?;
    Ok(match m {
        RqMessage::KeepAlive => Message::KeepAlive,
        RqMessage::Choke => Message::Choke,
        RqMessage::Unchoke => Message::Unchoke,
        RqMessage::Interested => Message::Interested,
        RqMessage::NotInterested => Message::NotInterested,
        RqMessage::Have(i) => Message::Have(piece("have", i)?),
        RqMessage::Bitfield(b) => {
            let b = b.as_ref();
            if b.len() != l.bitfield_len() {
                return Err(WireError::BitfieldLength {
                    got: b.len(),
                    want: l.bitfield_len(),
                    count: l.count(),
                });
            }
            let bits = Bits::from_bytes(l.count(), b);
            // BEP 3: spare bits must be clear.
            if bits.to_bytes() != b {
                return Err(WireError::SpareBits);
            }
            Message::Bitfield(bits)
        }
        RqMessage::Request(q) => {
            Message::Request(block("request", q.index, q.begin, u64::from(q.length))?)
        }
        RqMessage::Cancel(q) => {
            Message::Cancel(block("cancel", q.index, q.begin, u64::from(q.length))?)
        }
        RqMessage::Piece(p) => Message::Piece(block(
            "block",
            p.index,
            p.begin,
            (frame.len() - PIECE_HEADER) as u64,
        )?),
        RqMessage::Extended(_) => Message::Other(id),
    })
}

/// Ours: no extensions, so peers send nothing beyond BEP 3.
pub fn handshake(info_hash: [u8; 20], peer_id: PeerId) -> [u8; HANDSHAKE_LEN] {
    let mut h = Handshake::new(
        librqbit_core::Id20::new(info_hash),
        librqbit_core::Id20::new(peer_id),
    );
    h.reserved = 0;
    let mut buf = [0u8; HANDSHAKE_LEN];
    let _ = h.serialize_unchecked_len(&mut buf);
    buf
}

/// The other side's handshake: (info hash, peer id).
pub fn parse_handshake(buf: &[u8; HANDSHAKE_LEN]) -> Result<([u8; 20], PeerId), WireError> {
    let (h, _) = Handshake::deserialize(buf).map_err(|e| WireError::Malformed {
        id: 0,
        why: format!("bad handshake: {e}"),
    })?;
    Ok((h.info_hash.0, h.peer_id.0))
}

fn encode(m: &RqMessage<'_>) -> Vec<u8> {
    let len = match m {
        RqMessage::Bitfield(b) => b.as_ref().len() + 5,
        _ => 32,
    };
    let mut buf = vec![0u8; len];
    let n = m.serialize(&mut buf, &Default::default).unwrap_or(0);
    buf.truncate(n);
    buf
}

/// Encoded messages this side sends.
pub mod out {
    use super::*;

    pub fn keepalive() -> Vec<u8> {
        encode(&RqMessage::KeepAlive)
    }

    pub fn unchoke() -> Vec<u8> {
        encode(&RqMessage::Unchoke)
    }

    pub fn interested(yes: bool) -> Vec<u8> {
        encode(&if yes {
            RqMessage::Interested
        } else {
            RqMessage::NotInterested
        })
    }

    pub fn bitfield(bytes: &[u8]) -> Vec<u8> {
        encode(&RqMessage::Bitfield(bytes.into()))
    }

    pub fn have(p: PieceIndex) -> Vec<u8> {
        encode(&RqMessage::Have(p.0))
    }

    pub fn claim(p: PieceIndex) -> Vec<u8> {
        let mut m = vec![0, 0, 0, 5, CLAIM_ID];
        m.extend_from_slice(&p.0.to_be_bytes());
        m
    }

    pub fn request(b: &Block) -> Vec<u8> {
        encode(&RqMessage::Request(b.request()))
    }

    pub fn cancel(b: &Block) -> Vec<u8> {
        encode(&RqMessage::Cancel(b.request()))
    }

    /// A piece message's header; its block follows.
    pub fn piece_header(b: &Block, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&(9 + b.len).to_be_bytes());
        buf.push(7);
        buf.extend_from_slice(&b.piece.0.to_be_bytes());
        buf.extend_from_slice(&b.begin.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u8, body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32 + 1).to_be_bytes().to_vec();
        f.push(id);
        f.extend_from_slice(body);
        f
    }

    fn req(id: u8, index: u32, begin: u32, len: u32) -> Vec<u8> {
        let mut b = index.to_be_bytes().to_vec();
        b.extend_from_slice(&begin.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        frame(id, &b)
    }

    /// 10 pieces of 64 KiB, the last one 1000 bytes.
    fn lengths() -> Lengths {
        Lengths::new(9 * 65536 + 1000, 65536).unwrap()
    }

    #[test]
    fn messages_decode_into_checked_types() {
        let l = lengths();
        let p = |i| l.piece(i).unwrap();
        assert_eq!(decode(&[0, 0, 0, 0], &l), Ok(Message::KeepAlive));
        assert_eq!(decode(&frame(1, &[]), &l), Ok(Message::Unchoke));
        assert_eq!(
            decode(&frame(4, &9u32.to_be_bytes()), &l),
            Ok(Message::Have(p(9)))
        );
        assert_eq!(
            decode(&req(6, 9, 0, 1000), &l),
            Ok(Message::Request(l.block(p(9), 0, 1000).unwrap()))
        );
        let mut piece = req(7, 3, 16384, 0);
        piece.truncate(13);
        piece.extend_from_slice(&[1; 100]);
        piece[..4].copy_from_slice(&109u32.to_be_bytes());
        assert_eq!(
            decode(&piece, &l),
            Ok(Message::Piece(l.block(p(3), 16384, 100).unwrap()))
        );
        assert_eq!(
            decode(&frame(CLAIM_ID, &2u32.to_be_bytes()), &l),
            Ok(Message::Claim(p(2)))
        );
        assert_eq!(decode(&frame(20, b"d1:md"), &l), Ok(Message::Other(20)));
        let bf = decode(&frame(5, &[0b1010_0000, 0b0100_0000]), &l).unwrap();
        let Message::Bitfield(b) = bf else {
            panic!("{bf:?}")
        };
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 2, 9]);
    }

    #[test]
    fn hostile_frames_are_refused_with_their_reason() {
        let l = lengths();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0, 0], "length prefix"),
            (vec![0, 0, 0, 5, 4, 0], "length prefix"),
            (
                frame(4, &10u32.to_be_bytes()),
                "have of piece 10, but the torrent has 10",
            ),
            (
                frame(4, &u32::MAX.to_be_bytes()),
                "have of piece 4294967295",
            ),
            (frame(CLAIM_ID, &99u32.to_be_bytes()), "claim of piece 99"),
            (frame(CLAIM_ID, &[1, 2]), "a claim of 2 bytes"),
            (req(6, 10, 0, 16384), "request of piece 10"),
            // begin + len overflows a u32.
            (
                req(6, 0, u32::MAX - 10, 100),
                "request of bytes 4294967285+100",
            ),
            (
                req(8, 0, 65000, 1000),
                "cancel of bytes 65000+1000 of piece 0",
            ),
            (req(6, 9, 0, 1001), "which has 1000"),
            (req(6, 0, 0, 0), "request of bytes 0+0"),
            (req(6, 0, 0, MAX_REQUEST + 1), "request of bytes 0+131073"),
            (frame(4, &[0, 0]), "message 4"),
            (
                frame(5, &[0]),
                "bitfield of 1 bytes for 10 pieces (2 bytes)",
            ),
            (frame(5, &[0, 0b0010_0000]), "past the last piece"),
            (frame(2, &[0]), "message 2"),
        ];
        for (f, why) in cases {
            let e = decode(&f, &l).expect_err(why).to_string();
            assert!(e.contains(why), "{f:?}: {e:?} lacks {why:?}");
        }
        // A block whose begin + length overflows, as a piece message.
        let mut piece = req(7, 0, u32::MAX - 3, 0);
        piece.truncate(13);
        piece.extend_from_slice(&[0; 16]);
        piece[..4].copy_from_slice(&25u32.to_be_bytes());
        let e = decode(&piece, &l).unwrap_err().to_string();
        assert!(e.contains("block of bytes 4294967292+16 of piece 0"), "{e}");
    }

    #[test]
    fn no_input_panics_the_decoder() {
        let l = lengths();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0..20_000usize {
            let mut f = vec![0u8; 5 + n % 24];
            for b in &mut f {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let len = (f.len() - 4) as u32;
            if n % 2 == 0 {
                f[..4].copy_from_slice(&len.to_be_bytes());
                f[4] = [4, 5, 6, 7, 8, CLAIM_ID][n % 6];
            }
            let _ = decode(&f, &l);
        }
    }
}
