//! Entry points of the fuzz targets in `fuzz/` (`scripts/fuzz`): each takes arbitrary bytes and
//! drives one of this crate's parsers with them. Not an API: hidden, and changed at will. A
//! target returns normally on every input; a panic is a bug.

use bytes::{Bytes, BytesMut};
use futures::FutureExt;

use crate::codec::Registry;
use crate::remote::direct::{Frame, next_frame};
use crate::remote::frame::FrameReader;
use crate::remote::seal::{LinkSecret, Opener, RECORD, Sealer};

/// The largest item the targets allow: small, so that a length prefix can reach it.
const MAX_ITEM: usize = 64 << 10;

/// The stream protocol's frames ([`crate::remote`]'s export and import): the first byte sets
/// the largest item, the rest is the stream.
pub fn queue_frames(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let mut reader = FrameReader::new(stream, 1 << (first % 20));
    for _ in 0..4096 {
        match reader.next().now_or_never() {
            Some(Ok(Some(_))) => {}
            // The end, an error, or (never, reading a slice) a wait.
            _ => return,
        }
    }
}

/// A direct link's frames as an inlet reads them, the stream cut into reads where its first
/// byte says.
pub fn direct_frames(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(first).max(1);
    let mut buf = BytesMut::new();
    let mut items = 0u64;
    for chunk in stream.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match next_frame(&mut buf, MAX_ITEM + 9) {
                Ok(Some(Frame::Data(e))) => {
                    assert!(e.item.len() <= MAX_ITEM, "an item over the limit");
                    items += 1;
                }
                Ok(Some(Frame::End | Frame::Mark(_))) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    std::hint::black_box(items);
}

/// A sealed direct link's records. First byte even: the rest is what an attacker writes on the
/// connection (records that must all be refused unless they were sealed with the link's key).
/// Odd: the rest is what the link's producer sends, sealed by it and opened by the inlet, which
/// must get it back exactly, then decoded as frames.
pub fn sealed_records(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let key = LinkSecret::from_bytes([7; 32]).key();
    let mut opener = Opener::new(&key);
    let step = usize::from(first >> 1).max(1) * 97;
    let mut raw = BytesMut::new();
    let mut plain = BytesMut::new();
    let wire: Bytes = if first & 1 == 0 {
        Bytes::copy_from_slice(rest)
    } else {
        let mut sealer = Sealer::new(&key);
        let Ok(sealed) = sealer.seal([rest]) else {
            return;
        };
        sealed
    };
    for chunk in wire.chunks(step) {
        raw.extend_from_slice(chunk);
        loop {
            match opener.open(&mut raw) {
                Ok(Some(p)) => {
                    assert!(p.len() <= RECORD, "a record over the limit");
                    plain.extend_from_slice(&p);
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(first & 1 == 0, "a sealed stream failed to open");
                    return;
                }
            }
        }
    }
    if first & 1 == 1 {
        assert_eq!(&plain[..], rest, "what was sealed is not what was opened");
        direct_frames(&plain);
    }
}

/// The codecs: the first byte picks a codec chain and the rest is an item to decode; or, for
/// the last choices, the rest is a codec name to resolve.
pub fn codecs(data: &[u8]) {
    const CHAINS: [&str; 8] = [
        "raw",
        "json",
        "cbor",
        "postcard",
        "zstd+cbor",
        "zstd+json",
        "zstd+zstd+postcard",
        "zstd+raw",
    ];
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let reg = Registry::new().with_decode_limit(1 << 20);
    match CHAINS.get(usize::from(first) % (CHAINS.len() + 1)) {
        Some(name) => {
            let Ok(codec) = reg.resolve(name) else {
                panic!("built-in codec {name} does not resolve");
            };
            if let Ok(v) = codec.decode_value(rest) {
                // What decodes encodes again (raw may refuse what is not bytes).
                let _ = std::hint::black_box(codec.encode(&v));
            }
        }
        None => {
            if let Ok(name) = std::str::from_utf8(rest) {
                let _ = std::hint::black_box(reg.resolve(name));
            }
        }
    }
}

/// A frame as both protocols write it: length, kind, body.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 1).unwrap_or(u32::MAX);
    let mut f = len.to_le_bytes().to_vec();
    f.push(kind);
    f.extend_from_slice(body);
    f
}

/// Seeds for the targets: valid inputs of each, by target name.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::remote::frame::{DATA, END, MARK, VERSION};
    let item = |priority: i64, payload: &[u8]| {
        let mut b = priority.to_le_bytes().to_vec();
        b.extend_from_slice(payload);
        frame(DATA, &b)
    };
    let mut hello = b"MVMQ".to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&64u32.to_le_bytes());
    hello.extend_from_slice(&(1u64 << 20).to_le_bytes());
    hello.extend_from_slice(&(64u64 << 10).to_le_bytes());
    let mut credit = 16u32.to_le_bytes().to_vec();
    credit.extend_from_slice(&4096u64.to_le_bytes());
    let mut stream = vec![16];
    for f in [
        frame(0, &hello),
        item(0, b"hello"),
        item(-3, &[0xff; 40]),
        frame(2, &credit),
        frame(MARK, &7u64.to_le_bytes()),
        frame(7, &[]),
        frame(5, &{
            let mut b = 9i64.to_le_bytes().to_vec();
            b.extend_from_slice(b"back");
            b
        }),
        frame(6, &[]),
        frame(END, &[]),
        frame(4, &[]),
    ] {
        stream.extend_from_slice(&f);
    }
    let mut direct = Vec::new();
    for f in [
        item(0, &[1, 2, 3, 4, 5, 6, 7, 8]),
        item(5, &[0; 300]),
        frame(MARK, &1u64.to_le_bytes()),
        item(-1, b"after the mark"),
        frame(END, &[]),
    ] {
        direct.extend_from_slice(&f);
    }
    let mut out = vec![("queue-frames", stream)];
    for step in [1u8, 7, 255] {
        let mut d = vec![step];
        d.extend_from_slice(&direct);
        out.push(("direct-frames", d));
    }
    // Sealed: the plaintext to seal (odd), and what a sealer wrote (even).
    let mut d = vec![3];
    d.extend_from_slice(&direct);
    out.push(("sealed-records", d));
    let key = LinkSecret::from_bytes([7; 32]).key();
    if let Ok(sealed) = Sealer::new(&key).seal([&direct[..]]) {
        let mut d = vec![2];
        d.extend_from_slice(&sealed);
        out.push(("sealed-records", d));
    }
    let reg = Registry::new();
    let value = (1.5f64, "text", vec![1u32, 2, 3], Some(true));
    for (i, name) in ["raw", "json", "cbor", "postcard", "zstd+cbor", "zstd+json"]
        .iter()
        .enumerate()
    {
        if let Ok(c) = reg.resolve(name) {
            let bytes = if *name == "raw" {
                c.encode(&Bytes::from_static(b"raw bytes"))
            } else {
                c.encode(&value)
            };
            if let Ok(b) = bytes {
                let mut d = vec![u8::try_from(i).unwrap_or(0)];
                d.extend_from_slice(&b);
                out.push(("codecs", d));
            }
        }
    }
    let mut d = vec![8];
    d.extend_from_slice(b"zstd+zstd+cbor");
    out.push(("codecs", d));
    out
}
