//! Reads archives written by the `tar` crate and hand-built hostile ones.

use flate2::write::GzEncoder;
use flate2::Compression;
use sandbox_archive::{
    classify, scan, ArchiveError, EntryKind, Gunzip, Limits, Summary, TarReader,
};
use std::io::{self, Cursor, Read, Write};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

/// A 512-byte header built field by field; `block()` fills in the checksum.
#[derive(Clone)]
struct RawHeader([u8; 512]);

impl RawHeader {
    /// A POSIX ustar header of an empty entry, mode 0644.
    fn new(name: &[u8], typeflag: u8) -> Self {
        let mut header = RawHeader([0; 512]);
        header.put(0, 100, name);
        header.put(100, 8, b"0000644\0");
        header.put(108, 8, b"0001750\0");
        header.put(116, 8, b"0001750\0");
        header.put(136, 12, b"14000000000\0");
        header.0[156] = typeflag;
        header.put(257, 6, b"ustar\0");
        header.put(263, 2, b"00");
        header.size(0)
    }

    fn gnu(mut self) -> Self {
        self.put(257, 8, b"ustar  \0");
        self
    }

    fn v7(mut self) -> Self {
        self.put(257, 8, &[0; 8]);
        self
    }

    fn prefix(mut self, prefix: &[u8]) -> Self {
        self.put(345, 155, prefix);
        self
    }

    fn link(mut self, link: &[u8]) -> Self {
        self.put(157, 100, link);
        self
    }

    /// Octal when it fits in 11 digits, GNU base-256 otherwise.
    fn size(mut self, size: u64) -> Self {
        if size < 1 << 33 {
            let text = format!("{size:011o}\0");
            self.put(124, 12, text.as_bytes());
        } else {
            let mut field = [0u8; 12];
            field[4..].copy_from_slice(&size.to_be_bytes());
            field[0] = 0x80;
            self.put(124, 12, &field);
        }
        self
    }

    fn put(&mut self, offset: usize, len: usize, value: &[u8]) {
        assert!(value.len() <= len, "field overflow at {offset}");
        self.0[offset..offset + len].fill(0);
        self.0[offset..offset + value.len()].copy_from_slice(value);
    }

    fn block(&self) -> [u8; 512] {
        let mut block = self.0;
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        block
    }
}

/// Appends a header, its data and the zero fill up to the next block.
fn push(archive: &mut Vec<u8>, header: &RawHeader, data: &[u8]) {
    archive.extend_from_slice(&header.block());
    archive.extend_from_slice(data);
    archive.resize(archive.len().next_multiple_of(512), 0);
}

fn push_end(archive: &mut Vec<u8>) {
    archive.resize(archive.len() + 1024, 0);
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // space, '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    assert_eq!(record.len(), len);
    record
}

#[derive(Debug, PartialEq, Eq)]
struct Got {
    path: String,
    kind: EntryKind,
    link: Option<String>,
    mode: u32,
    data: Vec<u8>,
}

/// Every entry with its data, read through `read_data` in small pieces.
fn read_all(reader: &mut TarReader<impl Read>) -> Result<Vec<Got>, ArchiveError> {
    let mut entries = Vec::new();
    while let Some(entry) = reader.next_entry()? {
        let mut data = Vec::new();
        let mut buf = [0u8; 700];
        loop {
            let n = reader.read_data(&mut buf).map_err(classify)?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        assert_eq!(data.len() as u64, entry.size);
        entries.push(Got {
            path: String::from_utf8(entry.path).unwrap(),
            kind: entry.kind,
            link: entry.link_name.map(|link| String::from_utf8(link).unwrap()),
            mode: entry.mode,
            data,
        });
    }
    Ok(entries)
}

fn read_bytes(archive: &[u8]) -> Result<Vec<Got>, ArchiveError> {
    read_all(&mut TarReader::new(archive, Limits::default()))
}

fn file(path: &str, data: &[u8]) -> Got {
    Got {
        path: path.to_owned(),
        kind: EntryKind::File,
        link: None,
        mode: 0o644,
        data: data.to_vec(),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn tar_builder_file(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, data).unwrap();
}

/// Deterministic incompressible bytes.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A reader that fails like a dropped connection.
struct Failing;

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::ConnectionReset))
    }
}

/// `count` copies of one block, produced on demand.
struct RepeatedBlock {
    block: [u8; 512],
    blocks_left: u64,
    offset: usize,
}

impl Read for RepeatedBlock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut written = 0;
        while written < buf.len() && self.blocks_left > 0 {
            let n = (512 - self.offset).min(buf.len() - written);
            buf[written..written + n].copy_from_slice(&self.block[self.offset..self.offset + n]);
            written += n;
            self.offset += n;
            if self.offset == 512 {
                self.offset = 0;
                self.blocks_left -= 1;
            }
        }
        Ok(written)
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn round_trip_of_tar_crate_archive() {
    let long_gnu = format!("{}/gnu-long-name.txt", "g".repeat(120));
    let long_ustar = format!("{}/{}", "u".repeat(90), "ustar-name.txt");
    let pax_path = format!("pax/{}/ü.txt", "p".repeat(200));
    let big = random_bytes(5000, 7);

    let mut builder = tar::Builder::new(Vec::new());
    tar_builder_file(&mut builder, "a.txt", b"hello");

    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    builder.append_data(&mut dir, "d/", io::empty()).unwrap();

    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_mode(0o777);
    link.set_size(0);
    builder
        .append_link(&mut link, "d/link", "../a.txt")
        .unwrap();

    tar_builder_file(&mut builder, &long_gnu, &big);

    let mut ustar = tar::Header::new_ustar();
    ustar.set_size(3);
    ustar.set_mode(0o600);
    builder
        .append_data(&mut ustar, &long_ustar, &b"abc"[..])
        .unwrap();

    builder
        .append_pax_extensions([("path", pax_path.as_bytes())])
        .unwrap();
    tar_builder_file(&mut builder, "placeholder", b"pax data");
    let archive = builder.into_inner().unwrap();

    let mut reader = TarReader::new(&archive[..], Limits::default());
    let entries = read_all(&mut reader).unwrap();
    assert_eq!(
        entries,
        [
            file("a.txt", b"hello"),
            Got {
                path: "d/".into(),
                kind: EntryKind::Dir,
                link: None,
                mode: 0o755,
                data: vec![],
            },
            Got {
                path: "d/link".into(),
                kind: EntryKind::Symlink,
                link: Some("../a.txt".into()),
                mode: 0o777,
                data: vec![],
            },
            file(&long_gnu, &big),
            Got {
                mode: 0o600,
                ..file(&long_ustar, b"abc")
            },
            file(&pax_path, b"pax data"),
        ]
    );
    // Six entries plus one GNU 'L' and one PAX 'x' record: the ustar long
    // name went into the prefix field, not into an 'L' record.
    assert_eq!(reader.entries_seen(), 8);
    let long_name_record = long_gnu.len() as u64 + 1; // the tar crate writes the NUL
    let pax_record_len = pax_record("path", pax_path.as_bytes()).len() as u64;
    assert_eq!(
        reader.bytes_seen(),
        5 + 5000 + 3 + 8 + long_name_record + pax_record_len
    );
}

#[test]
fn round_trip_of_hand_built_headers() {
    let mut archive = Vec::new();
    // ustar prefix + name.
    push(
        &mut archive,
        &RawHeader::new(b"name.txt", b'0').prefix(b"pre/fix").size(2),
        b"hi",
    );
    // GNU magic: the prefix bytes hold times and must not be joined.
    push(
        &mut archive,
        &RawHeader::new(b"gnu.txt", b'0')
            .gnu()
            .prefix(b"garbage")
            .size(1),
        b"g",
    );
    // GNU long name and long link before a hard link.
    let long_name = "n".repeat(300);
    let long_link = "l".repeat(200);
    let mut name_data = long_name.clone().into_bytes();
    name_data.extend_from_slice(b"\0\0");
    push(
        &mut archive,
        &RawHeader::new(b"././@LongLink", b'L')
            .gnu()
            .size(name_data.len() as u64),
        &name_data,
    );
    push(
        &mut archive,
        &RawHeader::new(b"././@LongLink", b'K')
            .gnu()
            .size(long_link.len() as u64),
        long_link.as_bytes(),
    );
    push(
        &mut archive,
        &RawHeader::new(b"short", b'1').gnu().link(b"short-target"),
        b"",
    );
    // PAX size overrides the header's size field; PAX linkpath a symlink's.
    let mut pax = pax_record("size", b"11");
    pax.extend(pax_record("mtime", b"1700000000.5"));
    push(
        &mut archive,
        &RawHeader::new(b"PaxHeaders/p", b'x').size(pax.len() as u64),
        &pax,
    );
    push(
        &mut archive,
        &RawHeader::new(b"p.txt", b'0').size(3),
        b"eleven byte",
    );
    let pax = pax_record("linkpath", b"far/away");
    push(
        &mut archive,
        &RawHeader::new(b"PaxHeaders/s", b'x').size(pax.len() as u64),
        &pax,
    );
    push(
        &mut archive,
        &RawHeader::new(b"sym", b'2').link(b"near"),
        b"",
    );
    // A global PAX header applies to nothing we use.
    let pax = pax_record("comment", b"hello");
    push(
        &mut archive,
        &RawHeader::new(b"global", b'g').size(pax.len() as u64),
        &pax,
    );
    // Contiguous file, devices, fifo.
    push(&mut archive, &RawHeader::new(b"c.bin", b'7').size(1), b"c");
    push(&mut archive, &RawHeader::new(b"tty", b'3'), b"");
    push(&mut archive, &RawHeader::new(b"sda", b'4'), b"");
    push(&mut archive, &RawHeader::new(b"pipe", b'6'), b"");
    push_end(&mut archive);

    let entries = read_bytes(&archive).unwrap();
    let summary: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.path.as_str(),
                e.kind,
                e.link.as_deref(),
                e.data.as_slice(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("pre/fix/name.txt", EntryKind::File, None, &b"hi"[..]),
            ("gnu.txt", EntryKind::File, None, b"g"),
            (
                long_name.as_str(),
                EntryKind::HardLink,
                Some(long_link.as_str()),
                b""
            ),
            ("p.txt", EntryKind::File, None, b"eleven byte"),
            ("sym", EntryKind::Symlink, Some("far/away"), b""),
            ("c.bin", EntryKind::File, None, b"c"),
            ("tty", EntryKind::CharDevice, None, b""),
            ("sda", EntryKind::BlockDevice, None, b""),
            ("pipe", EntryKind::Fifo, None, b""),
        ]
    );
}

#[test]
fn size_field_of_dirs_links_and_special_files_is_ignored() {
    let mut archive = Vec::new();
    // Each declares 1000 bytes but none follow.
    for (name, typeflag) in [
        (&b"dir/"[..], b'5'),
        (b"hard", b'1'),
        (b"soft", b'2'),
        (b"chr", b'3'),
        (b"blk", b'4'),
        (b"fifo", b'6'),
    ] {
        push(
            &mut archive,
            &RawHeader::new(name, typeflag).size(1000),
            b"",
        );
    }
    // An unknown type's data is skipped.
    push(
        &mut archive,
        &RawHeader::new(b"volume", b'V').size(700),
        &[b'v'; 700],
    );
    // v7: no magic, directory marked by the trailing slash.
    push(&mut archive, &RawHeader::new(b"old/", b'\0').v7(), b"");
    push(
        &mut archive,
        &RawHeader::new(b"last", b'0').size(4),
        b"last",
    );
    push_end(&mut archive);

    let mut reader = TarReader::new(&archive[..], Limits::default());
    let entries = read_all(&mut reader).unwrap();
    let kinds: Vec<_> = entries.iter().map(|e| (e.kind, e.data.len())).collect();
    assert_eq!(
        kinds,
        [
            (EntryKind::Dir, 0),
            (EntryKind::HardLink, 0),
            (EntryKind::Symlink, 0),
            (EntryKind::CharDevice, 0),
            (EntryKind::BlockDevice, 0),
            (EntryKind::Fifo, 0),
            (EntryKind::Other(b'V'), 700),
            (EntryKind::Dir, 0),
            (EntryKind::File, 4),
        ]
    );
    assert_eq!(entries.last().unwrap().data, b"last");
    assert_eq!(reader.bytes_seen(), 704);
}

#[test]
fn unread_data_is_skipped_and_read_trait_works() {
    let mut builder = tar::Builder::new(Vec::new());
    let first = random_bytes(20_000, 1);
    tar_builder_file(&mut builder, "first", &first);
    tar_builder_file(&mut builder, "second", b"second data");
    let archive = builder.into_inner().unwrap();

    let mut reader = TarReader::new(&archive[..], Limits::default());
    let entry = reader.next_entry().unwrap().unwrap();
    assert_eq!(entry.size, 20_000);
    let mut some = [0u8; 100];
    assert_eq!(reader.read_data(&mut some).unwrap(), 100);
    assert_eq!(&some[..], &first[..100]);

    let entry = reader.next_entry().unwrap().unwrap();
    assert_eq!(entry.path, b"second");
    let mut data = Vec::new();
    io::copy(&mut reader, &mut data).unwrap();
    assert_eq!(data, b"second data");
    assert!(reader.next_entry().unwrap().is_none());
    assert!(reader.next_entry().unwrap().is_none());
}

#[test]
fn clean_eof_on_a_block_boundary_ends_the_archive() {
    let mut archive = Vec::new();
    push(&mut archive, &RawHeader::new(b"a", b'0').size(3), b"abc");
    let summary = scan(&archive[..], Limits::default()).unwrap();
    assert_eq!(
        summary,
        Summary {
            entries: 1,
            uncompressed_bytes: 3
        }
    );
}

#[test]
fn metadata_record_with_no_entry_after_it_is_corrupt() {
    let mut archive = Vec::new();
    push(
        &mut archive,
        &RawHeader::new(b"././@LongLink", b'L').size(4),
        b"name",
    );
    push_end(&mut archive);
    assert!(matches!(
        scan(&archive[..], Limits::default()),
        Err(ArchiveError::Corrupt(_))
    ));
}

// ---------------------------------------------------------------- hostile archives

#[test]
fn gnu_sparse_entry_is_refused_without_reading_it() {
    let started = Instant::now();
    let header = RawHeader::new(b"holes.img", b'S')
        .gnu()
        .size(1 << 62)
        .block();
    // Endless input after the header: reading the declared data would hang.
    let input = Cursor::new(header).chain(io::repeat(0));
    let error = scan(input, Limits::default()).unwrap_err();
    assert!(
        matches!(&error, ArchiveError::Sparse { name } if name == "holes.img"),
        "{error:?}"
    );
    assert!(error.is_limit());
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn pax_gnu_sparse_keys_are_refused() {
    for key in ["GNU.sparse.major", "GNU.sparse.size", "GNU.sparse.map"] {
        let mut archive = Vec::new();
        // The sparse key first: the name is still the entry's.
        let mut pax = pax_record(key, b"1");
        pax.extend(pax_record("path", b"real-name"));
        push(
            &mut archive,
            &RawHeader::new(b"PaxHeaders/x", b'x').size(pax.len() as u64),
            &pax,
        );
        push(
            &mut archive,
            &RawHeader::new(b"GNUSparseFile.0/x", b'0'),
            b"",
        );
        push_end(&mut archive);
        let error = scan(&archive[..], Limits::default()).unwrap_err();
        assert!(
            matches!(&error, ArchiveError::Sparse { name } if name == "real-name"),
            "{key}: {error:?}"
        );
    }

    // GNU tar 1.0 sparse format: the real name is in GNU.sparse.name.
    let mut archive = Vec::new();
    let mut pax = pax_record("GNU.sparse.major", b"1");
    pax.extend(pax_record("GNU.sparse.minor", b"0"));
    pax.extend(pax_record("GNU.sparse.name", b"disk.img"));
    pax.extend(pax_record("GNU.sparse.realsize", b"4611686018427387904"));
    pax.extend(pax_record("path", b"./GNUSparseFile.0/disk.img"));
    push(
        &mut archive,
        &RawHeader::new(b"PaxHeaders/disk.img", b'x').size(pax.len() as u64),
        &pax,
    );
    let error = scan(Cursor::new(archive).chain(io::repeat(0)), Limits::default()).unwrap_err();
    assert!(
        matches!(&error, ArchiveError::Sparse { name } if name == "disk.img"),
        "{error:?}"
    );
}

#[test]
fn oversized_metadata_records_are_refused_without_reading() {
    for typeflag in [b'L', b'K', b'x', b'g'] {
        let started = Instant::now();
        let header = RawHeader::new(b"././@LongLink", typeflag)
            .size(4 * GIB)
            .block();
        // Would need 4 GiB of memory (and input) if read whole.
        let input = Cursor::new(header).chain(io::repeat(b'a'));
        let error = scan(input, Limits::default()).unwrap_err();
        assert!(
            matches!(error, ArchiveError::HeaderTooLong { limit: 65536 }),
            "{}: {error:?}",
            typeflag as char
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

#[test]
fn metadata_record_at_the_cap_is_read_and_one_byte_more_is_not() {
    let limits = Limits {
        max_header_bytes: 1000,
        ..Limits::default()
    };
    let archive_with_name = |len: usize| {
        let mut archive = Vec::new();
        push(
            &mut archive,
            &RawHeader::new(b"././@LongLink", b'L').size(len as u64),
            &vec![b'n'; len],
        );
        push(&mut archive, &RawHeader::new(b"short", b'0'), b"");
        push_end(&mut archive);
        archive
    };
    let at_cap = archive_with_name(1000);
    let mut reader = TarReader::new(&at_cap[..], limits);
    assert_eq!(reader.next_entry().unwrap().unwrap().path, vec![b'n'; 1000]);
    assert!(matches!(
        scan(&archive_with_name(1001)[..], limits),
        Err(ArchiveError::HeaderTooLong { limit: 1000 })
    ));
}

fn empty_files(count: usize) -> Vec<u8> {
    let mut archive = Vec::new();
    for i in 0..count {
        push(
            &mut archive,
            &RawHeader::new(format!("f{i}").as_bytes(), b'0'),
            b"",
        );
    }
    push_end(&mut archive);
    archive
}

#[test]
fn entry_count_limit() {
    let archive = empty_files(1000);
    let limit = |max_entries| Limits {
        max_entries,
        ..Limits::default()
    };
    let error = scan(&archive[..], limit(999)).unwrap_err();
    assert!(matches!(error, ArchiveError::TooManyEntries { limit: 999 }));
    assert!(error.is_limit());
    assert_eq!(scan(&archive[..], limit(1000)).unwrap().entries, 1000);

    // Metadata records count: 300 files with a long name each are 600.
    let mut archive = Vec::new();
    for i in 0..300 {
        let name = format!("{}{i}", "x".repeat(150));
        push(
            &mut archive,
            &RawHeader::new(b"././@LongLink", b'L').size(name.len() as u64),
            name.as_bytes(),
        );
        push(&mut archive, &RawHeader::new(b"short", b'0'), b"");
    }
    push_end(&mut archive);
    assert_eq!(scan(&archive[..], limit(600)).unwrap().entries, 600);
    assert!(matches!(
        scan(&archive[..], limit(599)),
        Err(ArchiveError::TooManyEntries { limit: 599 })
    ));
}

#[test]
fn a_million_entries_pass_the_default_limit() {
    let header = RawHeader::new(b"empty-file", b'0').block();
    let archive = |entries| {
        RepeatedBlock {
            block: header,
            blocks_left: entries,
            offset: 0,
        }
        .chain(io::repeat(0).take(1024))
    };
    let started = Instant::now();
    let summary = scan(archive(1_000_000), Limits::default()).unwrap();
    assert_eq!(
        summary,
        Summary {
            entries: 1_000_000,
            uncompressed_bytes: 0
        }
    );
    eprintln!("1,000,000 entries scanned in {:?}", started.elapsed());

    // The same generator over the limit (a small one, to stay fast).
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    assert!(matches!(
        scan(archive(11), limits),
        Err(ArchiveError::TooManyEntries { limit: 10 })
    ));
}

#[test]
fn declared_size_beyond_max_bytes_is_refused_before_reading() {
    let limits = Limits {
        max_bytes: GIB,
        ..Limits::default()
    };
    let started = Instant::now();
    let header = RawHeader::new(b"huge.bin", b'0').size(1 << 40).block();
    let input = Cursor::new(header).chain(io::repeat(0));
    let error = scan(input, limits).unwrap_err();
    assert!(
        matches!(error, ArchiveError::TooLarge { limit: GIB }),
        "{error:?}"
    );
    assert!(error.is_limit());

    // Also when the size comes from PAX and the header says 0.
    let mut archive = Vec::new();
    let pax = pax_record("size", (1u64 << 40).to_string().as_bytes());
    push(
        &mut archive,
        &RawHeader::new(b"PaxHeaders/h", b'x').size(pax.len() as u64),
        &pax,
    );
    archive.extend_from_slice(&RawHeader::new(b"huge.bin", b'0').block());
    let input = Cursor::new(archive).chain(io::repeat(0));
    assert!(matches!(
        scan(input, limits),
        Err(ArchiveError::TooLarge { limit: GIB })
    ));
    assert!(started.elapsed() < Duration::from_secs(1));

    // The sum counts: two 600-byte files against a 1000-byte limit.
    let mut archive = Vec::new();
    push(
        &mut archive,
        &RawHeader::new(b"a", b'0').size(600),
        &[1; 600],
    );
    push(
        &mut archive,
        &RawHeader::new(b"b", b'0').size(600),
        &[2; 600],
    );
    push_end(&mut archive);
    let small = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let mut reader = TarReader::new(&archive[..], small);
    assert_eq!(reader.next_entry().unwrap().unwrap().size, 600);
    assert!(matches!(
        reader.next_entry(),
        Err(ArchiveError::TooLarge { limit: 1000 })
    ));
    assert_eq!(reader.bytes_seen(), 600);
}

#[test]
fn size_with_largest_u64_does_not_overflow() {
    let header = RawHeader::new(b"max", b'0').size(u64::MAX).block();
    let limits = Limits {
        max_bytes: u64::MAX,
        ..Limits::default()
    };
    let mut input = Vec::new();
    push(&mut input, &RawHeader::new(b"one", b'0').size(1), b"1");
    input.extend_from_slice(&header);
    let mut reader = TarReader::new(&input[..], limits);
    assert_eq!(reader.next_entry().unwrap().unwrap().size, 1);
    assert!(matches!(
        reader.next_entry(),
        Err(ArchiveError::TooLarge { limit: u64::MAX })
    ));
}

#[test]
fn base256_size_is_read() {
    let mut header = RawHeader::new(b"b256.bin", b'0');
    let mut field = [0u8; 12];
    field[0] = 0x80;
    field[10..].copy_from_slice(&1000u16.to_be_bytes());
    header.put(124, 12, &field);
    let data = random_bytes(1000, 3);
    let mut archive = Vec::new();
    push(&mut archive, &header, &data);
    push(&mut archive, &RawHeader::new(b"after", b'0').size(1), b"!");
    push_end(&mut archive);
    let entries = read_bytes(&archive).unwrap();
    assert_eq!(entries, [file("b256.bin", &data), file("after", b"!")]);

    // Negative base-256 is corrupt.
    let mut header = RawHeader::new(b"neg", b'0');
    header.put(124, 12, &[0xff; 12]);
    let mut archive = Vec::new();
    push(&mut archive, &header, b"");
    assert!(matches!(
        read_bytes(&archive),
        Err(ArchiveError::Corrupt(_))
    ));
}

// ---------------------------------------------------------------- corruption and I/O errors

#[test]
fn truncated_archives_are_corrupt() {
    let mut builder = tar::Builder::new(Vec::new());
    tar_builder_file(&mut builder, "data.bin", &random_bytes(10_000, 9));
    let archive = builder.into_inner().unwrap();

    for cut in [512 + 5000, 512 + 10_000, 100, 512 + 10_240 + 10] {
        let error = scan(&archive[..cut], Limits::default()).unwrap_err();
        assert!(
            matches!(&error, ArchiveError::Corrupt(message) if message == "truncated archive"),
            "cut at {cut}: {error:?}"
        );
        assert!(!error.is_limit());
    }

    let mut reader = TarReader::new(&archive[..512 + 5000], Limits::default());
    reader.next_entry().unwrap().unwrap();
    let error = io::copy(&mut reader, &mut io::sink()).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    assert!(matches!(classify(error), ArchiveError::Corrupt(_)));

    // And cut inside the gzip stream.
    let compressed = gzip(&archive);
    let cut = &compressed[..compressed.len() - 10];
    let error = scan(Gunzip::new(cut, &Limits::default()), Limits::default()).unwrap_err();
    assert!(matches!(error, ArchiveError::Corrupt(_)), "{error:?}");
}

#[test]
fn bad_checksum_is_corrupt_and_signed_checksums_are_accepted() {
    let mut archive = Vec::new();
    push(&mut archive, &RawHeader::new(b"file", b'0').size(1), b"x");
    push_end(&mut archive);
    archive[0] = b'F'; // changed after the checksum was computed
    let error = scan(&archive[..], Limits::default()).unwrap_err();
    assert!(
        matches!(&error, ArchiveError::Corrupt(message) if message.contains("checksum")),
        "{error:?}"
    );

    // Old writers summed signed chars; a name with high bytes tells the two apart.
    let mut block = RawHeader::new("naïve-ß".as_bytes(), b'0').0;
    block[148..156].fill(b' ');
    let signed: i64 = block.iter().map(|&b| i64::from(b as i8)).sum();
    block[148..156].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
    let mut archive = block.to_vec();
    push_end(&mut archive);
    let entries = read_bytes(&archive).unwrap();
    assert_eq!(entries[0].path, "naïve-ß");
}

#[test]
fn errors_of_the_inner_reader_stay_io_errors() {
    let mut reader = TarReader::new(Failing, Limits::default());
    match reader.next_entry() {
        Err(ArchiveError::Io(error)) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("{other:?}"),
    }
    // Nothing more after a failure.
    assert!(reader.next_entry().is_err());

    let mut header = Vec::new();
    push(&mut header, &RawHeader::new(b"f", b'0').size(100), b"");
    header.truncate(512);
    let mut reader = TarReader::new(Cursor::new(header).chain(Failing), Limits::default());
    reader.next_entry().unwrap().unwrap();
    let error = reader.read_data(&mut [0; 10]).unwrap_err();
    assert!(matches!(classify(error), ArchiveError::Io(_)));
}

#[test]
fn classify_unwraps_archive_errors() {
    let wrapped = io::Error::other(ArchiveError::RatioExceeded { limit: 7 });
    assert!(matches!(
        classify(wrapped),
        ArchiveError::RatioExceeded { limit: 7 }
    ));
    let bad_data = io::Error::new(io::ErrorKind::InvalidData, "corrupt deflate stream");
    assert!(
        matches!(classify(bad_data), ArchiveError::Corrupt(message) if message == "corrupt deflate stream")
    );
    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
    assert!(
        matches!(classify(eof), ArchiveError::Corrupt(message) if message == "truncated archive")
    );
    let reset = io::Error::from(io::ErrorKind::ConnectionReset);
    assert!(matches!(classify(reset), ArchiveError::Io(_)));
}

#[test]
fn concatenated_gzip_members_read_as_one_tar_stream() {
    let mut first = tar::Builder::new(Vec::new());
    tar_builder_file(&mut first, "one.txt", b"first member");
    let mut first = first.into_inner().unwrap();
    first.truncate(first.len() - 1024); // no end-of-archive marker
    let mut second = tar::Builder::new(Vec::new());
    tar_builder_file(&mut second, "two.txt", b"second member");
    let second = second.into_inner().unwrap();

    let mut body = gzip(&first);
    body.extend(gzip(&second));
    let mut reader = TarReader::new(
        Gunzip::new(&body[..], &Limits::default()),
        Limits::default(),
    );
    assert_eq!(
        read_all(&mut reader).unwrap(),
        [
            file("one.txt", b"first member"),
            file("two.txt", b"second member")
        ]
    );
}

#[test]
fn non_gzip_input_is_not_gzip() {
    for body in [&b""[..], b"\x1f", b"plain text, not gzip", b"\x1f\x00rest"] {
        let error = scan(Gunzip::new(body, &Limits::default()), Limits::default()).unwrap_err();
        assert!(
            matches!(error, ArchiveError::NotGzip),
            "{body:?}: {error:?}"
        );
    }
    // Garbage after a valid member is a damaged archive, not a wrong format.
    let mut archive = Vec::new();
    push(&mut archive, &RawHeader::new(b"a", b'0').size(1), b"a");
    push_end(&mut archive);
    let mut body = gzip(&archive);
    body.extend_from_slice(b"trailing junk");
    let error = scan(
        Gunzip::new(&body[..], &Limits::default()),
        Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(error, ArchiveError::Corrupt(_)), "{error:?}");
    // A gzip trailer damaged after the end-of-archive marker is noticed.
    let mut body = gzip(&archive);
    let crc = body.len() - 8;
    body[crc] ^= 0xff;
    let error = scan(
        Gunzip::new(&body[..], &Limits::default()),
        Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(error, ArchiveError::Corrupt(_)), "{error:?}");
}

// ---------------------------------------------------------------- gzip ratio guard

/// Gzip of `len` zero bytes, compressed as it is read.
fn gzipped_zeros(len: u64) -> impl Read {
    flate2::read::GzEncoder::new(io::repeat(0).take(len), Compression::default())
}

/// Decompresses everything; returns (bytes out, the error if any).
fn drain(gunzip: &mut Gunzip<impl Read>) -> Result<u64, ArchiveError> {
    io::copy(gunzip, &mut io::sink()).map_err(classify)
}

#[test]
fn gzip_bomb_trips_the_ratio_guard() {
    let limits = Limits::default();
    let mut gunzip = Gunzip::new(gzipped_zeros(200 * MIB), &limits);
    let error = drain(&mut gunzip).unwrap_err();
    assert!(
        matches!(error, ArchiveError::RatioExceeded { limit: 200 }),
        "{error:?}"
    );
    assert!(error.is_limit());
    // Stopped right at the floor, not after expanding everything.
    assert!(gunzip.decompressed_bytes() <= limits.ratio_floor);
    assert!(gunzip.decompressed_bytes() > limits.ratio_floor - MIB);
    // And stays stopped.
    assert!(gunzip.read(&mut [0; 10]).is_err());
}

#[test]
fn ratio_guard_waits_for_the_floor() {
    let ratio = |ratio_floor, max_ratio| Limits {
        ratio_floor,
        max_ratio,
        ..Limits::default()
    };
    // 16 MiB of zeros expands ~1000:1 but stays under the default 64 MiB floor.
    assert_eq!(
        drain(&mut Gunzip::new(
            gzipped_zeros(16 * MIB),
            &Limits::default()
        ))
        .unwrap(),
        16 * MIB
    );
    // The same with a 4 MiB floor trips.
    assert!(matches!(
        drain(&mut Gunzip::new(
            gzipped_zeros(16 * MIB),
            &ratio(4 * MIB, 200)
        )),
        Err(ArchiveError::RatioExceeded { limit: 200 })
    ));
    // A ratio of 0 disables the guard even with no floor.
    assert_eq!(
        drain(&mut Gunzip::new(gzipped_zeros(16 * MIB), &ratio(0, 0))).unwrap(),
        16 * MIB
    );
}

#[test]
fn incompressible_data_passes_the_ratio_guard() {
    let data = random_bytes(MIB as usize, 42);
    let compressed = gzip(&data);
    for limits in [
        Limits::default(),
        Limits {
            ratio_floor: 0,
            max_ratio: 2,
            ..Limits::default()
        },
    ] {
        let mut gunzip = Gunzip::new(&compressed[..], &limits);
        let mut out = Vec::new();
        gunzip.read_to_end(&mut out).unwrap();
        assert!(out == data);
        assert_eq!(gunzip.compressed_bytes(), compressed.len() as u64);
    }
}

#[test]
fn ratio_guard_errors_come_through_the_tar_reader() {
    // A tar holding one 32 MiB file of zeros, compressed as it streams.
    let header = RawHeader::new(b"zeros.bin", b'0').size(32 * MIB).block();
    let tar = Cursor::new(header)
        .chain(io::repeat(0).take(32 * MIB))
        .chain(io::repeat(0).take(1024));
    let body = flate2::read::GzEncoder::new(tar, Compression::default());
    let limits = Limits {
        ratio_floor: MIB,
        ..Limits::default()
    };
    let error = scan(Gunzip::new(body, &limits), limits).unwrap_err();
    assert!(
        matches!(error, ArchiveError::RatioExceeded { limit: 200 }),
        "{error:?}"
    );
}

#[test]
fn data_after_the_end_marker_is_bounded() {
    let mut archive = Vec::new();
    push(&mut archive, &RawHeader::new(b"a", b'5'), &[]);
    push_end(&mut archive);
    let padded = [archive.clone(), vec![0u8; 1 << 20]].concat();
    assert_eq!(
        scan(
            Gunzip::new(Cursor::new(gzip(&padded)), &Limits::default()),
            Limits::default()
        )
        .unwrap()
        .entries,
        1
    );
    let endless = [archive, vec![0u8; 17 << 20]].concat();
    let error = scan(
        Gunzip::new(Cursor::new(gzip(&endless)), &Limits::default()),
        Limits::default(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("follow the end of the archive"),
        "{error}"
    );
}
