//! Archives a hostile client would upload, written header by header so
//! each one lies exactly where the reader has to be careful.

use std::io::Write;

const BLOCK: usize = 512;

/// A ustar header; `size` above the octal range is written in GNU base-256.
pub fn header(name: &str, typeflag: u8, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 0o77777777777 {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn gz(parts: &[&[u8]]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for part in parts {
        encoder.write_all(part).unwrap();
    }
    encoder.finish().unwrap()
}

/// A GNU sparse entry declaring 2^62 bytes: ~80 bytes gzipped.
pub fn sparse_bomb() -> Vec<u8> {
    gz(&[&header("holes", b'S', 1 << 62), &[0u8; 1024]])
}

/// A GNU long-name record (`L`) or PAX header (`x`) declaring `size`
/// bytes, followed by far less.
pub fn oversized_record(typeflag: u8, size: u64) -> Vec<u8> {
    gz(&[&header("././@LongLink", typeflag, size), &[b'a'; 4096]])
}

/// `n` empty files, generated and compressed as a stream.
pub fn many_entries(n: u64) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for i in 0..n {
        encoder
            .write_all(&header(&format!("f{i}"), b'0', 0))
            .unwrap();
    }
    encoder.write_all(&[0u8; 1024]).unwrap();
    encoder.finish().unwrap()
}

/// One file of `size` zero bytes: gzip expands it ~1000:1.
pub fn zeros(size: u64) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&header("zeros", b'0', size)).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        encoder.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
    encoder.write_all(&vec![0u8; pad as usize]).unwrap();
    encoder.write_all(&[0u8; 1024]).unwrap();
    encoder.finish().unwrap()
}

/// Two gzip members, each a tar stream; together one valid archive (what
/// `cat a.tar.gz b.tar.gz` makes when the first has no end marker).
pub fn concatenated_members() -> Vec<u8> {
    let mut first = Vec::new();
    first.extend_from_slice(&header("a.txt", b'0', 3));
    first.extend_from_slice(b"one");
    first.extend_from_slice(&[0u8; BLOCK - 3]);
    let mut second = Vec::new();
    second.extend_from_slice(&header("b.txt", b'0', 3));
    second.extend_from_slice(b"two");
    second.extend_from_slice(&[0u8; BLOCK - 3]);
    second.extend_from_slice(&[0u8; 1024]);
    let mut out = gz(&[&first]);
    out.extend(gz(&[&second]));
    out
}
