//! Empty ext4 images made on the host: a namespace sandbox's disk, and the
//! base of a microVM volume layer.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

use crate::process;

/// Creates `image` as a sparse file of `bytes` holding an empty ext4
/// filesystem (no journal: the disk dies with the sandbox; no reserved
/// blocks: the quota is all the tenant's). About 50 ms, and a few MB on
/// the host until the sandbox writes.
pub fn create_image(image: &Path, bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)?;
    file.set_len(bytes)?;
    drop(file);
    process::output(
        Command::new(mkfs_ext4())
            .args(["-q", "-F", "-O", "^has_journal", "-m", "0"])
            .args(["-E", "nodiscard,lazy_itable_init=1,root_owner=0:0"])
            .arg(image),
    )?;
    Ok(())
}

/// Where mkfs.ext4 is (root's PATH usually has /sbin; services may not).
pub fn mkfs_ext4() -> std::path::PathBuf {
    crate::templates::find_in_path("mkfs.ext4").unwrap_or_else(|| "mkfs.ext4".into())
}
