//! Building templates with mmdebstrap: cached by definition hash, rebuilt on
//! change, serialised across processes. Root only (and slow the first time).

mod common;

use sandbox_runtime::{TemplateCatalog, TemplateDef, TemplateError, TemplateStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_template_builds_once_and_contains_the_sandbox_user() {
    common::init_tracing();
    if common::should_skip("base_template_builds_once_and_contains_the_sandbox_user") {
        return;
    }
    let catalog = common::catalog();
    let rootfs = common::base_rootfs().await;
    assert_eq!(catalog.status("base").unwrap(), TemplateStatus::Ready);

    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l == "user:x:1000:1000::/home/user:/bin/bash"),
        "{passwd}"
    );
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("user:x:1000:")));
    use std::os::unix::fs::MetadataExt;
    let home = std::fs::metadata(rootfs.join("home/user")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    for dir in [".envd", ".oldroot"] {
        assert!(rootfs.join(dir).is_dir(), "{dir} missing");
    }
    for binary in ["bin/bash", "usr/bin/curl", "bin/tar", "bin/gzip", "bin/ps"] {
        assert!(rootfs.join(binary).exists(), "{binary} missing");
    }

    // Unchanged definition: cached, returns immediately.
    let t = std::time::Instant::now();
    assert_eq!(catalog.build("base", false).await.unwrap(), rootfs);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "rebuilt: {:?}",
        t.elapsed()
    );

    assert!(matches!(
        catalog.build("no-such-template", false).await,
        Err(TemplateError::Unknown(_))
    ));
}

/// A tiny template in a private dir: a changed definition reads as Stale and
/// is rebuilt; concurrent builders serialise on the lock and share one build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_definition_rebuilds_and_concurrent_builds_share_one_result() {
    common::init_tracing();
    if common::should_skip("changed_definition_rebuilds_and_concurrent_builds_share_one_result") {
        return;
    }
    if std::env::var_os("SANDBOX_RUNTIME_SLOW_TESTS").is_none() {
        println!("SKIP: set SANDBOX_RUNTIME_SLOW_TESTS=1 to run two extra minbase builds");
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut def = TemplateDef::parse(
        "tiny",
        r#"
            suite = "bookworm"
            mirror = "http://deb.debian.org/debian"
            packages = []
        "#,
    )
    .unwrap();
    let catalog = TemplateCatalog::from_definitions([def.clone()], dir.path());
    assert_eq!(catalog.status("tiny").unwrap(), TemplateStatus::Missing);

    let (first, second) = tokio::join!(catalog.build("tiny", false), catalog.build("tiny", false));
    assert_eq!(first.unwrap(), second.unwrap());
    assert_eq!(catalog.status("tiny").unwrap(), TemplateStatus::Ready);

    def.packages = vec!["gzip".into(), "less".into()];
    let changed = TemplateCatalog::from_definitions([def], dir.path());
    assert_eq!(changed.status("tiny").unwrap(), TemplateStatus::Stale);
    let rootfs = changed.ensure_built("tiny").await.unwrap();
    assert!(rootfs.join("usr/bin/less").exists());
    assert_eq!(changed.status("tiny").unwrap(), TemplateStatus::Ready);
}
