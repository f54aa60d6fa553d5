//! A streaming `.tar.gz` reader for archives that may be hostile.
//!
//! Volume uploads are validated by the server while they stream and unpacked
//! by the in-sandbox agent; both read archives written by whoever holds an
//! API key. General-purpose tar readers trust what a header declares: a GNU
//! sparse entry claiming 2^62 bytes of holes makes them produce zeros forever
//! without reading input, a GNU long-name or PAX record of several GB is read
//! whole into memory, and nothing bounds the entry count, the total size or
//! the gzip expansion ratio.
//!
//! This reader checks every declared size against [`Limits`] before acting on
//! it, reads metadata records only up to a small cap, refuses sparse entries,
//! and skips data through a fixed buffer. Memory stays
//! O(`max_header_bytes`) and work stays proportional to the bytes actually
//! read, whatever the archive claims.
//!
//! Supported: ustar (with prefix), GNU (long names and links, base-256
//! numbers), PAX extended headers (`path`, `linkpath`, `size`), old v7.

mod gunzip;
mod header;

use header::{Header, BLOCK};
use std::io::{self, Read};

pub use gunzip::{Gunzip, GZIP_MAGIC};

/// Limits enforced while reading. All checks happen before the bytes are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sum of entry data sizes (declared sizes, checked at each header before
    /// reading data). Metadata records count too.
    pub max_bytes: u64,
    /// Number of entries yielded (metadata records like 'L','K','x','g' count
    /// too, so a flood of them is bounded).
    pub max_entries: u64,
    /// Max length of a GNU long name/link entry and of a PAX extended header
    /// entry (bytes). Such records are read with this cap, never whole.
    pub max_header_bytes: u64,
    /// Decompression-ratio guard for [`Gunzip`]: error when decompressed >
    /// `max_ratio` * compressed, checked once decompressed exceeds
    /// `ratio_floor` bytes. 0 disables.
    pub max_ratio: u64,
    pub ratio_floor: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 16 << 30,
            max_entries: 1_000_000,
            max_header_bytes: 64 << 10,
            max_ratio: 200,
            ratio_floor: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a gzip archive (the body must be a .tar.gz)")]
    NotGzip,
    #[error("corrupt archive: {0}")]
    Corrupt(String),
    #[error("archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("archive expands to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("archive has a name, link or PAX header longer than {limit} bytes")]
    HeaderTooLong { limit: u64 },
    #[error("sparse entries are not supported ({name})")]
    Sparse { name: String },
    #[error("archive expands more than {limit}:1 (a decompression bomb?)")]
    RatioExceeded { limit: u64 },
    /// An error of the underlying reader (e.g. the client went away).
    #[error("{0}")]
    Io(io::Error),
}

impl ArchiveError {
    /// Whether the archive was refused for exceeding a limit rather than for
    /// being malformed or unreadable.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            ArchiveError::TooManyEntries { .. }
                | ArchiveError::TooLarge { .. }
                | ArchiveError::HeaderTooLong { .. }
                | ArchiveError::Sparse { .. }
                | ArchiveError::RatioExceeded { .. }
        )
    }
}

/// Maps an `io::Error` coming out of [`TarReader`] or [`Gunzip`] back to an
/// [`ArchiveError`]: a wrapped `ArchiveError` is unwrapped, an early end or
/// undecodable data is corruption, anything else is the reader's own error.
pub fn classify(error: io::Error) -> ArchiveError {
    let error = match error.downcast::<ArchiveError>() {
        Ok(archive) => return archive,
        Err(error) => error,
    };
    match error.kind() {
        io::ErrorKind::UnexpectedEof => ArchiveError::Corrupt("truncated archive".to_owned()),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
            ArchiveError::Corrupt(error.to_string())
        }
        _ => ArchiveError::Io(error),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    HardLink,
    CharDevice,
    BlockDevice,
    Fifo,
    Other(u8),
}

impl EntryKind {
    fn from_typeflag(typeflag: u8) -> Self {
        match typeflag {
            b'0' | b'\0' | b'7' => EntryKind::File,
            b'1' => EntryKind::HardLink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::CharDevice,
            b'4' => EntryKind::BlockDevice,
            b'5' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            other => EntryKind::Other(other),
        }
    }

    /// Whether data blocks follow the header. Links, directories and special
    /// files carry none whatever their size field says (as GNU tar and
    /// Python's tarfile read them); unknown types are assumed to.
    fn has_data(self) -> bool {
        matches!(self, EntryKind::File | EntryKind::Other(_))
    }
}

#[derive(Debug, Clone)]
pub struct EntryHeader {
    pub path: Vec<u8>,
    pub link_name: Option<Vec<u8>>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of data that [`TarReader::read_data`] will return (0 for kinds
    /// that carry no data).
    pub size: u64,
}

/// Streams the entries of an uncompressed tar (wrap the input in [`Gunzip`]
/// for a `.tar.gz`). Reads the inner reader in blocks of 512 bytes or less,
/// so give it a buffered reader.
pub struct TarReader<R: Read> {
    inner: R,
    limits: Limits,
    entries_seen: u64,
    bytes_seen: u64,
    /// Data bytes of the current entry not yet returned by `read_data`.
    remaining: u64,
    /// Zero fill after the current entry's data, up to the next block.
    padding: u64,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Finished,
    /// An error was returned; the position in the stream is unknown, so no
    /// further entries are produced.
    Failed,
}

/// What metadata records said about the entry that follows them.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_link: Option<Vec<u8>>,
    pax_size: Option<u64>,
    seen: bool,
}

impl Pending {
    fn path(&self) -> Option<&Vec<u8>> {
        self.pax_path.as_ref().or(self.long_name.as_ref())
    }
}

/// Fixed buffer through which skipped data is read and discarded.
const SKIP_BUFFER: usize = 8192;

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, limits: Limits) -> Self {
        TarReader {
            inner,
            limits,
            entries_seen: 0,
            bytes_seen: 0,
            remaining: 0,
            padding: 0,
            state: State::Reading,
        }
    }

    /// Next real entry (metadata records are folded in), or `None` at the
    /// end-of-archive marker (a zero block) or at a clean end of input on a
    /// block boundary. Any unread data and padding of the previous entry is
    /// skipped first.
    ///
    /// After an error the reader is finished: every later call fails too.
    pub fn next_entry(&mut self) -> Result<Option<EntryHeader>, ArchiveError> {
        match self.state {
            State::Finished => return Ok(None),
            State::Failed => {
                return Err(ArchiveError::Corrupt(
                    "archive reading already failed".to_owned(),
                ))
            }
            State::Reading => {}
        }
        let result = self.advance();
        match result {
            Ok(Some(_)) => {}
            Ok(None) => self.state = State::Finished,
            Err(_) => self.state = State::Failed,
        }
        result
    }

    /// Reads the current entry's data (returns 0 at its end). Input ending
    /// before the declared size is an error of kind `UnexpectedEof`.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining).map_or(buf.len(), |left| left.min(buf.len()));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside an entry's data",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Entries counted against `max_entries`, metadata records included.
    pub fn entries_seen(&self) -> u64 {
        self.entries_seen
    }

    /// Declared data sizes counted against `max_bytes` so far, metadata
    /// records included.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn advance(&mut self) -> Result<Option<EntryHeader>, ArchiveError> {
        self.skip(self.remaining.saturating_add(self.padding))?;
        self.remaining = 0;
        self.padding = 0;

        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            if !self.read_block(&mut block)? || header::is_zero_block(&block) {
                if pending.seen {
                    return Err(ArchiveError::Corrupt(
                        "archive ends after a long-name or PAX record with no entry".to_owned(),
                    ));
                }
                return Ok(None);
            }
            let header = Header::parse(&block)?;
            match header.typeflag {
                b'S' => {
                    // Refused before looking at its data: the sparse map is
                    // what lets a tiny input declare an enormous file.
                    let name = pending.path().unwrap_or(&header.path);
                    return Err(ArchiveError::Sparse {
                        name: String::from_utf8_lossy(name).into_owned(),
                    });
                }
                typeflag @ (b'L' | b'K' | b'x' | b'g') => {
                    self.count_entry()?;
                    if header.size > self.limits.max_header_bytes {
                        return Err(ArchiveError::HeaderTooLong {
                            limit: self.limits.max_header_bytes,
                        });
                    }
                    self.count_bytes(header.size)?;
                    let data = self.read_record(header.size)?;
                    pending.seen = true;
                    match typeflag {
                        b'L' => pending.long_name = Some(trim_trailing_nuls(data)),
                        b'K' => pending.long_link = Some(trim_trailing_nuls(data)),
                        b'x' => apply_pax(&data, &header.path, &mut pending)?,
                        _ => {} // global PAX defaults: nothing we use
                    }
                }
                typeflag => return self.start_entry(header, typeflag, pending).map(Some),
            }
        }
    }

    fn start_entry(
        &mut self,
        header: Header,
        typeflag: u8,
        pending: Pending,
    ) -> Result<EntryHeader, ArchiveError> {
        let path = pending
            .pax_path
            .or(pending.long_name)
            .unwrap_or(header.path);
        let link_name = pending
            .pax_link
            .or(pending.long_link)
            .unwrap_or(header.link_name);
        let mut kind = EntryKind::from_typeflag(typeflag);
        // Pre-POSIX writers marked directories only by a trailing slash.
        if typeflag == b'\0' && path.ends_with(b"/") {
            kind = EntryKind::Dir;
        }
        let size = if kind.has_data() {
            pending.pax_size.unwrap_or(header.size)
        } else {
            0
        };
        self.count_entry()?;
        self.count_bytes(size)?;
        self.remaining = size;
        self.padding = padding_after(size);
        Ok(EntryHeader {
            path,
            link_name: (!link_name.is_empty()).then_some(link_name),
            kind,
            mode: header.mode,
            uid: header.uid,
            gid: header.gid,
            size,
        })
    }

    fn count_entry(&mut self) -> Result<(), ArchiveError> {
        if self.entries_seen >= self.limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        self.entries_seen += 1;
        Ok(())
    }

    fn count_bytes(&mut self, size: u64) -> Result<(), ArchiveError> {
        match self.bytes_seen.checked_add(size) {
            Some(total) if total <= self.limits.max_bytes => {
                self.bytes_seen = total;
                Ok(())
            }
            _ => Err(ArchiveError::TooLarge {
                limit: self.limits.max_bytes,
            }),
        }
    }

    /// Reads a whole header block; false at a clean end of input.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, ArchiveError> {
        match self.fill(block)? {
            0 => Ok(false),
            BLOCK => Ok(true),
            _ => Err(truncated()),
        }
    }

    /// The data of a metadata record (size already checked against the cap)
    /// and its padding.
    fn read_record(&mut self, size: u64) -> Result<Vec<u8>, ArchiveError> {
        let len = usize::try_from(size).map_err(|_| truncated())?;
        let mut data = vec![0; len];
        if self.fill(&mut data)? < len {
            return Err(truncated());
        }
        self.skip(padding_after(size))?;
        Ok(data)
    }

    /// Reads until `buf` is full or the input ends; returns the bytes read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(classify(error)),
            }
        }
        Ok(filled)
    }

    fn skip(&mut self, mut count: u64) -> Result<(), ArchiveError> {
        let mut scratch = [0u8; SKIP_BUFFER];
        while count > 0 {
            let chunk = usize::try_from(count).map_or(SKIP_BUFFER, |count| count.min(SKIP_BUFFER));
            if self.fill(&mut scratch[..chunk])? < chunk {
                return Err(truncated());
            }
            count -= chunk as u64;
        }
        Ok(())
    }
}

/// Same as [`TarReader::read_data`], so the current entry can be handed to
/// `io::copy`.
impl<R: Read> Read for TarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_data(buf)
    }
}

/// Applies the `path`, `linkpath` and `size` records of a PAX extended header
/// to the entry that follows. An empty value deletes the key (POSIX).
fn apply_pax(data: &[u8], record_name: &[u8], pending: &mut Pending) -> Result<(), ArchiveError> {
    let mut sparse = false;
    let mut sparse_name = None;
    header::for_each_pax_record(data, |key, value| {
        if key.starts_with(b"GNU.sparse.") {
            sparse = true;
            if key == b"GNU.sparse.name" {
                sparse_name = Some(value.to_vec());
            }
        }
        let value = (!value.is_empty()).then_some(value);
        match key {
            b"path" => pending.pax_path = value.map(<[u8]>::to_vec),
            b"linkpath" => pending.pax_link = value.map(<[u8]>::to_vec),
            b"size" => pending.pax_size = value.map(header::parse_decimal).transpose()?,
            _ => {}
        }
        Ok(())
    })?;
    if sparse {
        // GNU tar's PAX sparse formats keep the real size and map in keys
        // (or a data prefix) this reader does not expand.
        let name = sparse_name
            .as_ref()
            .or(pending.path())
            .map_or(record_name, Vec::as_slice);
        return Err(ArchiveError::Sparse {
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    Ok(())
}

fn trim_trailing_nuls(mut data: Vec<u8>) -> Vec<u8> {
    let len = data
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    data.truncate(len);
    data
}

fn padding_after(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn truncated() -> ArchiveError {
    ArchiveError::Corrupt("truncated archive".to_owned())
}

/// What [`scan`] counted: the quantities the limits apply to, metadata
/// records included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub uncompressed_bytes: u64,
}

/// Decompressed bytes [`scan`] accepts after the end-of-archive marker
/// (tar pads to its record size, 10 KiB by default; 1 MiB at `-b 2048`).
pub const MAX_TRAILING_BYTES: u64 = 16 << 20;

/// Reads all entries, discarding data, then reads the input to its end (so
/// a damaged gzip trailer after the end-of-archive marker is noticed too).
/// Used by the upload check.
pub fn scan<R: Read>(reader: R, limits: Limits) -> Result<Summary, ArchiveError> {
    let mut tar = TarReader::new(reader, limits);
    while tar.next_entry()?.is_some() {}
    let summary = Summary {
        entries: tar.entries_seen(),
        uncompressed_bytes: tar.bytes_seen(),
    };
    let mut rest = tar.into_inner();
    let mut scratch = [0u8; SKIP_BUFFER];
    let mut trailing = 0u64;
    loop {
        match rest.read(&mut scratch) {
            Ok(0) => return Ok(summary),
            Ok(n) => {
                // Padding to the record size is a few KiB; a stream that
                // goes on is work outside every other limit.
                trailing += n as u64;
                if trailing > MAX_TRAILING_BYTES {
                    return Err(ArchiveError::Corrupt(format!(
                        "more than {MAX_TRAILING_BYTES} bytes follow the end of the archive"
                    )));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(classify(error)),
        }
    }
}
