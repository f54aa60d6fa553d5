//! Gzip decoding with a decompression-ratio guard.
//!
//! Deflate can expand about 1000:1, so a few GiB of upload can become
//! terabytes of tar stream. Byte limits in the tar reader bound what an
//! archive may declare; this bounds how much CPU a small body can cost by
//! refusing output far out of proportion to input.

use crate::{ArchiveError, Limits};
use flate2::read::MultiGzDecoder;
use std::io::{self, Read};

/// The two bytes every gzip member starts with.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A multi-member gzip decoder (like `flate2::read::MultiGzDecoder`) that
/// counts compressed bytes in and decompressed bytes out.
///
/// Errors are `io::Error`s; those wrapping an [`ArchiveError`] (a stream not
/// starting with the gzip magic gives [`ArchiveError::NotGzip`], the ratio
/// guard gives [`ArchiveError::RatioExceeded`]) are unwrapped by
/// [`classify`](crate::classify).
pub struct Gunzip<R: Read> {
    decoder: MultiGzDecoder<Counted<R>>,
    max_ratio: u64,
    ratio_floor: u64,
    produced: u64,
    tripped: bool,
}

impl<R: Read> Gunzip<R> {
    pub fn new(inner: R, limits: &Limits) -> Self {
        Gunzip {
            decoder: MultiGzDecoder::new(Counted {
                inner,
                consumed: 0,
                not_gzip: false,
            }),
            max_ratio: limits.max_ratio,
            ratio_floor: limits.ratio_floor,
            produced: 0,
            tripped: false,
        }
    }

    /// Compressed bytes taken from the inner reader so far (the decoder reads
    /// ahead, so this can run up to one buffer ahead of what was decoded).
    pub fn compressed_bytes(&self) -> u64 {
        self.decoder.get_ref().consumed
    }

    /// Decompressed bytes handed out so far.
    pub fn decompressed_bytes(&self) -> u64 {
        self.produced
    }

    /// The inner reader; bytes the decoder had read ahead are lost.
    pub fn into_inner(self) -> R {
        self.decoder.into_inner().inner
    }

    fn ratio_error(&self) -> io::Error {
        io::Error::other(ArchiveError::RatioExceeded {
            limit: self.max_ratio,
        })
    }
}

impl<R: Read> Read for Gunzip<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tripped {
            return Err(self.ratio_error());
        }
        let n = self.decoder.read(buf)?;
        let produced = self.produced.saturating_add(n as u64);
        // Checked before the bytes are handed out, so a caller never sees
        // output beyond the allowed ratio.
        if self.max_ratio != 0
            && produced > self.ratio_floor
            && produced > self.max_ratio.saturating_mul(self.compressed_bytes())
        {
            self.tripped = true;
            return Err(self.ratio_error());
        }
        self.produced = produced;
        Ok(n)
    }
}

/// Counts the bytes the decoder pulls in, and rejects a stream that does not
/// start with the gzip magic with `NotGzip` (flate2 would only say "invalid
/// gzip header", indistinguishable from a damaged later member).
struct Counted<R> {
    inner: R,
    consumed: u64,
    not_gzip: bool,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.not_gzip {
            return Err(io::Error::other(ArchiveError::NotGzip));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if self.consumed < GZIP_MAGIC.len() as u64 {
            let start = self.consumed as usize;
            let magic_matches = n > 0
                && buf[..n]
                    .iter()
                    .zip(&GZIP_MAGIC[start..])
                    .all(|(got, want)| got == want);
            if !magic_matches {
                self.not_gzip = true;
                return Err(io::Error::other(ArchiveError::NotGzip));
            }
        }
        self.consumed += n as u64;
        Ok(n)
    }
}
