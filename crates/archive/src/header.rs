//! One 512-byte tar header block, and the records of a PAX extended header.
//!
//! Everything here works on bytes already in memory; the reader decides how
//! many bytes to pull in, so nothing in this module can be made to allocate
//! or loop beyond the size of its input.

use crate::ArchiveError;

pub(crate) const BLOCK: usize = 512;

const POSIX_MAGIC: &[u8; 6] = b"ustar\0";

/// The fields of a header block that the reader needs, already validated.
pub(crate) struct Header {
    pub typeflag: u8,
    pub path: Vec<u8>,
    pub link_name: Vec<u8>,
    pub mode: u32,
    /// Owner ids; 0 where the field is blank or unreadable (volumes ignore
    /// them, so an odd writer's field is no reason to refuse an archive).
    pub uid: u32,
    pub gid: u32,
    /// The size field as written; what it means depends on the typeflag.
    pub size: u64,
}

impl Header {
    pub fn parse(block: &[u8; BLOCK]) -> Result<Self, ArchiveError> {
        verify_checksum(block)?;
        let name = until_nul(&block[0..100]);
        // The prefix field only exists in POSIX ustar; GNU headers keep
        // access/change times in the same bytes.
        let prefix = if &block[257..263] == POSIX_MAGIC {
            until_nul(&block[345..500])
        } else {
            &[]
        };
        let mut path = Vec::with_capacity(prefix.len() + 1 + name.len());
        if !prefix.is_empty() {
            path.extend_from_slice(prefix);
            path.push(b'/');
        }
        path.extend_from_slice(name);
        let mode = parse_numeric(&block[100..108])
            .and_then(|mode| u32::try_from(mode).map_err(|_| corrupt("mode field out of range")))?;
        let id = |field: &[u8]| {
            parse_numeric(field)
                .ok()
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(0)
        };
        Ok(Header {
            typeflag: block[156],
            path,
            link_name: until_nul(&block[157..257]).to_vec(),
            mode,
            uid: id(&block[108..116]),
            gid: id(&block[116..124]),
            size: parse_numeric(&block[124..136])?,
        })
    }
}

pub(crate) fn is_zero_block(block: &[u8; BLOCK]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// The checksum is the sum of the header bytes with the checksum field
/// itself counted as spaces. Historic writers summed signed chars, so both
/// sums are accepted.
fn verify_checksum(block: &[u8; BLOCK]) -> Result<(), ArchiveError> {
    let stored = parse_octal(&block[148..156])?;
    let (block_sum, block_high) = byte_sums(block);
    let (field_sum, field_high) = byte_sums(&block[148..156]);
    let unsigned = block_sum - field_sum + 8 * u64::from(b' ');
    // A byte read as a signed char counts 256 less when its high bit is set.
    let signed = unsigned as i64 - 256 * (block_high - field_high) as i64;
    if stored == unsigned || i64::try_from(stored).is_ok_and(|stored| stored == signed) {
        Ok(())
    } else {
        Err(corrupt("bad header checksum"))
    }
}

/// The sum of `bytes` and how many of them have the high bit set, a word at
/// a time: this runs for every header, and byte by byte it was most of the
/// cost of an archive of many small entries. `bytes` is whole words, at most
/// one block, so the 16-bit lanes (at most 64 * 510) and 8-bit lanes (at most
/// 64) cannot overflow.
fn byte_sums(bytes: &[u8]) -> (u64, u64) {
    const EVEN_BYTES: u64 = 0x00ff_00ff_00ff_00ff;
    const LOW_BITS: u64 = 0x0101_0101_0101_0101;
    debug_assert!(bytes.len() & 7 == 0 && bytes.len() <= BLOCK);
    let mut pair_sums = 0u64;
    let mut high_counts = 0u64;
    // Indexing rather than slice iterators keeps unoptimized builds (tests)
    // fast too.
    let mut at = 0;
    while at < bytes.len() {
        let b = &bytes[at..at + 8];
        let word = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        at += 8;
        pair_sums += (word & EVEN_BYTES) + ((word >> 8) & EVEN_BYTES);
        high_counts += (word >> 7) & LOW_BITS;
    }
    let sum = (pair_sums & 0xffff)
        + ((pair_sums >> 16) & 0xffff)
        + ((pair_sums >> 32) & 0xffff)
        + (pair_sums >> 48);
    // Widen the counts to 16-bit lanes before adding them up: eight lanes of
    // up to 64 can exceed a byte.
    let high_pairs = (high_counts & EVEN_BYTES) + ((high_counts >> 8) & EVEN_BYTES);
    let high = high_pairs.wrapping_mul(0x0001_0001_0001_0001) >> 48;
    (sum, high)
}

/// A numeric header field: octal text, or GNU base-256 when the high bit of
/// the first byte is set (used for sizes of 8 GiB and more).
pub(crate) fn parse_numeric(field: &[u8]) -> Result<u64, ArchiveError> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => parse_base256(field),
        _ => parse_octal(field),
    }
}

/// Base-256: the bits after the leading marker bit are a big-endian two's
/// complement number, so 0x40 in the first byte is the sign.
fn parse_base256(field: &[u8]) -> Result<u64, ArchiveError> {
    let first = field[0];
    if first & 0x40 != 0 {
        return Err(corrupt("negative number in a header field"));
    }
    let mut value = u64::from(first & 0x3f);
    for &byte in &field[1..] {
        if value > u64::MAX >> 8 {
            return Err(corrupt("number in a header field out of range"));
        }
        value = value << 8 | u64::from(byte);
    }
    Ok(value)
}

/// Octal digits, optionally surrounded by spaces, ended by NUL or space or
/// the end of the field. An empty field is zero.
fn parse_octal(field: &[u8]) -> Result<u64, ArchiveError> {
    let digits = trim_spaces(until_nul(field));
    let mut value: u64 = 0;
    for &byte in digits {
        if !(b'0'..=b'7').contains(&byte) {
            return Err(corrupt("invalid octal number in a header field"));
        }
        value = value
            .checked_mul(8)
            .and_then(|value| value.checked_add(u64::from(byte - b'0')))
            .ok_or_else(|| corrupt("number in a header field out of range"))?;
    }
    Ok(value)
}

/// Calls `apply(key, value)` for each record of a PAX extended header
/// ("LEN key=value\n", LEN counting the whole record).
pub(crate) fn for_each_pax_record(
    mut data: &[u8],
    mut apply: impl FnMut(&[u8], &[u8]) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let bad = || corrupt("malformed PAX extended header");
    // Some writers pad the record area with NULs.
    while data.first().is_some_and(|&b| b != 0) {
        let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let mut len: usize = 0;
        for &byte in &data[..space] {
            if !byte.is_ascii_digit() {
                return Err(bad());
            }
            len = len
                .checked_mul(10)
                .and_then(|len| len.checked_add(usize::from(byte - b'0')))
                .ok_or_else(bad)?;
        }
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &data[space + 1..len - 1];
        let equals = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        apply(&record[..equals], &record[equals + 1..])?;
        data = &data[len..];
    }
    Ok(())
}

/// A decimal PAX value such as `size`.
pub(crate) fn parse_decimal(value: &[u8]) -> Result<u64, ArchiveError> {
    let bad = || corrupt("invalid number in a PAX extended header");
    if value.is_empty() {
        return Err(bad());
    }
    value.iter().try_fold(0u64, |acc, &byte| {
        if !byte.is_ascii_digit() {
            return Err(bad());
        }
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(byte - b'0')))
            .ok_or_else(bad)
    })
}

pub(crate) fn until_nul(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn trim_spaces(mut bytes: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' '] = bytes {
        bytes = rest;
    }
    bytes
}

fn corrupt(message: &str) -> ArchiveError {
    ArchiveError::Corrupt(message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base256_size_is_parsed() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[7] = 0x01; // 2^32
        field[11] = 0x05;
        assert_eq!(parse_numeric(&field).unwrap(), (1 << 32) + 5);

        // 2^62: beyond what 11 octal digits can express.
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[4] = 0x40;
        assert_eq!(parse_numeric(&field).unwrap(), 1 << 62);

        let mut max = [0xffu8; 12];
        max[..4].copy_from_slice(&[0x80, 0, 0, 0]);
        assert_eq!(parse_numeric(&max).unwrap(), u64::MAX);
    }

    #[test]
    fn base256_rejects_negative_and_overflow() {
        let negative = [0xffu8; 12]; // -1
        assert!(matches!(
            parse_numeric(&negative),
            Err(ArchiveError::Corrupt(_))
        ));
        let mut too_big = [0u8; 12];
        too_big[0] = 0x80;
        too_big[3] = 0x01; // 2^64
        assert!(matches!(
            parse_numeric(&too_big),
            Err(ArchiveError::Corrupt(_))
        ));
    }

    #[test]
    fn byte_sums_match_a_plain_loop() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = [0u8; BLOCK];
        for byte in random.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *byte = seed as u8;
        }
        for block in [[0u8; BLOCK], [0xff; BLOCK], [0x80; BLOCK], random] {
            let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
            let high = block.iter().filter(|&&b| b >= 0x80).count() as u64;
            assert_eq!(byte_sums(&block), (sum, high));
            let field = &block[148..156];
            let field_high = field.iter().filter(|&&b| b >= 0x80).count() as u64;
            assert_eq!(byte_sums(field).1, field_high);
        }
    }

    #[test]
    fn octal_accepts_the_spellings_writers_use() {
        assert_eq!(parse_numeric(b"00000001750\0").unwrap(), 1000);
        assert_eq!(parse_numeric(b"   1750 \0\0\0\0").unwrap(), 1000);
        assert_eq!(parse_numeric(b"001750 ").unwrap(), 1000);
        assert_eq!(parse_numeric(b"\0\0\0\0").unwrap(), 0);
        assert_eq!(parse_numeric(b"        ").unwrap(), 0);
        assert_eq!(parse_numeric(b"777777777777").unwrap(), 0o777777777777);
        assert!(parse_numeric(b"0000000017a0").is_err());
        assert!(parse_numeric(b"00 17").is_err());
    }

    #[test]
    fn pax_records_are_split_and_validated() {
        let mut seen = Vec::new();
        for_each_pax_record(b"18 path=a/b/c.txt\n9 size=5\n\0\0", |key, value| {
            seen.push((key.to_vec(), value.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (b"path".to_vec(), b"a/b/c.txt".to_vec()),
                (b"size".to_vec(), b"5".to_vec())
            ]
        );
        let ignore = |_: &[u8], _: &[u8]| Ok(());
        for bad in [
            &b"99 path=x\n"[..],
            b"10 path=xy\n", // length one short: the record does not end in '\n'
            b"x path=x\n",
            b"8 pathx\n",
            b"18446744073709551616 a=b\n",
        ] {
            assert!(for_each_pax_record(bad, ignore).is_err(), "{bad:?}");
        }
    }
}
