//! Host id ranges handed out per sandbox, claimed host-wide.
//!
//! Slots are claimed host-side by creating `/run/sandbox-manager/KIND/N`
//! (`O_EXCL`), holding the sandbox's state directory; a slot whose
//! directory is gone is stale and reclaimed. The claims are host-wide (two
//! servers on one host never hand out the same ids) and live on a tmpfs,
//! so they end with the host's boot, as the sandboxes do.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The host ids a sandbox's ids `0..count` map to (namespace sandboxes:
/// its uids and gids; microVMs: a single gid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub base: u32,
    pub count: u32,
}

impl IdRange {
    /// The host id of `inside` (e.g. 0 for the sandbox's root).
    pub fn host_id(&self, inside: u32) -> u32 {
        self.base + inside
    }
}

/// Where the host-wide slot claims live.
pub const SLOTS_ROOT: &str = "/run/sandbox-manager";

/// Hands out per-sandbox id ranges `[base + slot × stride, + stride)` for
/// `slot < slots` (namespace sandboxes: uid ranges; microVMs: one gid each).
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    dir: PathBuf,
    base: u32,
    stride: u32,
    slots: u32,
}

impl SlotAllocator {
    /// Claims live in `dir` (e.g. `/run/sandbox-manager/uid-slots`).
    pub fn new(dir: PathBuf, base: u32, stride: u32, slots: u32) -> Self {
        Self {
            dir,
            base,
            stride,
            slots,
        }
    }

    fn range(&self, slot: u32) -> IdRange {
        IdRange {
            base: self.base + slot * self.stride,
            count: self.stride,
        }
    }

    /// Claims a free slot for the sandbox whose state lives in `owner` (an
    /// absolute path). Callers serialise claims within one process;
    /// `O_EXCL` keeps two processes from sharing a slot.
    pub fn claim(&self, owner: &Path) -> io::Result<IdRange> {
        let id = owner.to_string_lossy();
        let id = id.as_ref();
        fs::create_dir_all(&self.dir)?;
        for slot in 0..self.slots {
            let path = self.dir.join(slot.to_string());
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(id.as_bytes())?;
                    return Ok(self.range(slot));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path).unwrap_or_default();
                    let holder_gone = !holder.is_empty() && !Path::new(&holder).exists();
                    if holder_gone && holder != id {
                        // Stale: its sandbox was removed without releasing.
                        fs::write(&path, id)?;
                        return Ok(self.range(slot));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "all {} id slots in {} are in use",
            self.slots,
            self.dir.display()
        )))
    }

    /// The range `owner` holds, if any.
    pub fn held_by(&self, owner: &Path) -> Option<IdRange> {
        let id = owner.to_string_lossy();
        (0..self.slots).find_map(|slot| {
            let holder = fs::read_to_string(self.dir.join(slot.to_string())).ok()?;
            (holder == id).then(|| self.range(slot))
        })
    }

    /// Releases every slot held by `owner`.
    pub fn release(&self, owner: &Path) {
        let id = owner.to_string_lossy();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if fs::read_to_string(entry.path()).is_ok_and(|holder| holder == id) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRIDE: u32 = 65_536;

    #[test]
    fn slots_are_exclusive_and_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let allocator = SlotAllocator::new(dir.path().join("slots"), 1_000_000, STRIDE, 2);
        let owner = |name: &str| {
            let path = dir.path().join(name);
            fs::create_dir_all(&path).unwrap();
            path
        };
        let (a, b, c, d) = (owner("a"), owner("b"), owner("c"), owner("d"));
        let range_a = allocator.claim(&a).unwrap();
        let range_b = allocator.claim(&b).unwrap();
        assert_eq!(range_a.base, 1_000_000);
        assert_eq!(range_b.base, 1_000_000 + STRIDE);
        assert!(allocator.claim(&c).is_err(), "only two slots");
        allocator.release(&a);
        assert_eq!(allocator.claim(&c).unwrap(), range_a);
        assert_eq!(allocator.held_by(&c), Some(range_a));
        assert_eq!(allocator.held_by(&a), None);
        // b's directory disappears without a release: its slot is stale.
        fs::remove_dir(&b).unwrap();
        assert_eq!(allocator.claim(&d).unwrap(), range_b);
    }
}
