//! Users of the sandbox, read from `<root>/etc/passwd` and `<root>/etc/group`
//! (parsed here, not through the host's NSS, which would describe the host).

use std::io::Read;

use envd_protocol::error_code;

use crate::error::{ApiError, ApiResult};
use crate::paths::{Ownership, SandboxRoot};

/// passwd/group files larger than this are refused (they are tiny in practice).
const MAX_ACCOUNT_FILE: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Home directory as a sandbox path.
    pub home: String,
    pub shell: String,
    /// Supplementary groups (from `/etc/group`), primary group included.
    pub groups: Vec<u32>,
}

impl User {
    pub fn ownership(&self) -> Ownership {
        Ownership {
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// Looks users up in the sandbox. When envd cannot switch users (it is not
/// root), every known user maps to envd's own uid/gid.
pub struct Users {
    can_switch: bool,
    own_uid: u32,
    own_gid: u32,
}

impl Users {
    pub fn new() -> Self {
        // SAFETY: trivial getters.
        let (own_uid, own_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Self {
            can_switch: own_uid == 0,
            own_uid,
            own_gid,
        }
    }

    pub fn can_switch(&self) -> bool {
        self.can_switch
    }

    pub fn lookup(&self, root: &SandboxRoot, name: &str) -> ApiResult<User> {
        let passwd = read_account_file(root, "/etc/passwd");
        let mut user = passwd
            .as_deref()
            .and_then(|text| parse_passwd(text, name))
            .or_else(|| builtin_user(name))
            .ok_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    error_code::UNKNOWN_USER,
                    format!("unknown user {name:?}: not in the sandbox's /etc/passwd"),
                )
            })?;
        if let Some(group) = read_account_file(root, "/etc/group") {
            user.groups = supplementary_groups(&group, &user.name, user.gid);
        }
        if !self.can_switch {
            user.uid = self.own_uid;
            user.gid = self.own_gid;
            user.groups = vec![self.own_gid];
        }
        Ok(user)
    }

    /// Owner for files created on behalf of `user`; `None` when envd cannot
    /// chown (unprivileged), so files keep envd's own uid.
    pub fn ownership(&self, user: &User) -> Option<Ownership> {
        self.can_switch.then(|| user.ownership())
    }
}

impl Default for Users {
    fn default() -> Self {
        Self::new()
    }
}

/// `root` and `user` exist in every template; keep them usable even when a
/// root directory (e.g. a test root) has no passwd entry for them.
fn builtin_user(name: &str) -> Option<User> {
    match name {
        "root" => Some(User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
            shell: "/bin/sh".into(),
            groups: vec![0],
        }),
        _ => None,
    }
}

fn read_account_file(root: &SandboxRoot, path: &str) -> Option<String> {
    let fd = root.open(path, libc::O_RDONLY | libc::O_NONBLOCK).ok()?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_ACCOUNT_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// `name:x:uid:gid:gecos:home:shell`.
fn parse_passwd(text: &str, name: &str) -> Option<User> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name {
            return None;
        }
        Some(User {
            name: fields[0].to_string(),
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: if fields[5].is_empty() {
                "/".into()
            } else {
                fields[5].to_string()
            },
            shell: fields[6].to_string(),
            groups: Vec::new(),
        })
    })
}

/// Groups listing `name` as a member (`group:x:gid:a,b,c`), plus `primary`.
fn supplementary_groups(text: &str, name: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(gid) = fields[2].parse::<u32>() else {
            continue;
        };
        if fields[3].split(',').any(|member| member == name) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_group() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";
        let user = parse_passwd(passwd, "user").unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (1000, 1000, "/home/user")
        );
        assert!(parse_passwd(passwd, "nobody").is_none());
        let group = "root:x:0:\nsudo:x:27:user,other\nuser:x:1000:\n";
        assert_eq!(supplementary_groups(group, "user", 1000), vec![1000, 27]);
    }
}
