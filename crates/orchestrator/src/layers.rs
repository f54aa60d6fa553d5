//! Node-local store of volume layers: each volume unpacked once per node,
//! then shared copy-on-write by every sandbox here that attaches it.
//!
//! A layer is keyed by its volume and content hash (a volume's content
//! never changes, so the pair names one tree; layers are never shared
//! across volumes, so one owner's timing cannot tell whether another owner
//! uploaded the same bytes). On disk, `dir/KEY.NONCE/` holds what the
//! runtime puts there (`tree/` for namespace sandboxes), `layer.json` once
//! the layer is sealed (its absence marks a build that never finished), and
//! `users/SANDBOX_ID` for every sandbox mounting it, so a restart knows
//! what is in use before the reconciler says which sandboxes survived.
//!
//! - **Single flight**: the first claim of a key builds; concurrent claims
//!   wait for that build and then share it, or all see its failure.
//! - **Budget**: sealed layers beyond `max_bytes` (disk usage) are removed
//!   least-recently-used first, but never one a sandbox still mounts.
//! - **Deleted volumes**: their layers go once the last user is gone.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

/// What a sealed layer holds (`layer.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub key: String,
    pub volume_id: String,
    pub files: u64,
    /// Bytes of file content (as the unpack reported them).
    pub bytes: u64,
    pub skipped: u64,
    /// What the layer occupies on the node's disk.
    pub disk_bytes: u64,
}

#[derive(Debug, Clone)]
enum State {
    Building,
    Ready(LayerInfo),
    Failed(String),
}

struct Layer {
    key: String,
    volume_id: String,
    dir: PathBuf,
    state: watch::Sender<State>,
    users: Mutex<HashSet<String>>,
    last_used: Mutex<Instant>,
    /// Its volume was deleted: remove once no sandbox mounts it.
    doomed: AtomicBool,
}

impl Layer {
    fn ready(&self) -> Option<LayerInfo> {
        match &*self.state.borrow() {
            State::Ready(info) => Some(info.clone()),
            _ => None,
        }
    }

    fn idle(&self) -> bool {
        self.users.lock().unwrap().is_empty()
    }

    fn add_user(&self, sandbox_id: &str) -> io::Result<()> {
        let users = self.dir.join(USERS);
        std::fs::create_dir_all(&users)?;
        std::fs::write(users.join(sandbox_id), b"")?;
        self.users.lock().unwrap().insert(sandbox_id.to_string());
        *self.last_used.lock().unwrap() = Instant::now();
        Ok(())
    }

    fn remove_user(&self, sandbox_id: &str) -> bool {
        let removed = self.users.lock().unwrap().remove(sandbox_id);
        if removed {
            let _ = std::fs::remove_file(self.dir.join(USERS).join(sandbox_id));
        }
        removed
    }
}

const USERS: &str = "users";
const INFO: &str = "layer.json";

/// The outcome of [`LayerStore::claim`].
pub enum Claim {
    /// Nobody has this layer: the caller builds it, then calls
    /// [`LayerBuild::succeed`] or [`LayerBuild::fail`].
    Build(LayerBuild),
    /// A sealed layer, now counted as used by the caller's sandbox.
    Share { dir: PathBuf, info: LayerInfo },
    /// The build this claim waited for failed.
    Failed(String),
}

/// A build in progress; dropping it unfinished fails it, so waiters are
/// never left hanging.
pub struct LayerBuild {
    store: Arc<LayerStore>,
    layer: Arc<Layer>,
    finished: bool,
}

impl LayerBuild {
    /// Where the runtime puts the layer.
    pub fn dir(&self) -> &Path {
        &self.layer.dir
    }

    /// Seals the layer: records it (with its disk usage) and `sandbox_id`
    /// as its first user, and wakes the waiters to share it.
    pub async fn succeed(
        mut self,
        sandbox_id: &str,
        files: u64,
        bytes: u64,
        skipped: u64,
    ) -> io::Result<LayerInfo> {
        self.finished = true;
        let layer = self.layer.clone();
        let sandbox = sandbox_id.to_string();
        let sealed = tokio::task::spawn_blocking(move || {
            let info = LayerInfo {
                key: layer.key.clone(),
                volume_id: layer.volume_id.clone(),
                files,
                bytes,
                skipped,
                disk_bytes: disk_usage(&layer.dir)?,
            };
            let partial = layer.dir.join(format!("{INFO}.partial"));
            std::fs::write(&partial, serde_json::to_vec(&info)?)?;
            std::fs::rename(&partial, layer.dir.join(INFO))?;
            layer.add_user(&sandbox)?;
            Ok::<_, io::Error>(info)
        })
        .await
        .map_err(io::Error::other)?;
        match sealed {
            Ok(info) => {
                self.layer.state.send_replace(State::Ready(info.clone()));
                tracing::info!(key = %info.key, files, disk_bytes = info.disk_bytes, "volume layer sealed");
                self.store.evict().await;
                Ok(info)
            }
            Err(e) => {
                self.store
                    .abandon(&self.layer, format!("sealing the layer: {e}"));
                Err(e)
            }
        }
    }

    pub fn fail(mut self, why: String) {
        self.finished = true;
        self.store.abandon(&self.layer, why);
    }
}

impl Drop for LayerBuild {
    fn drop(&mut self) {
        if !self.finished {
            self.store
                .abandon(&self.layer, "the layer build was abandoned".into());
        }
    }
}

pub struct LayerStore {
    dir: PathBuf,
    max_bytes: u64,
    layers: Mutex<HashMap<String, Arc<Layer>>>,
}

/// How much of the store is used (for `/health` and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LayerStats {
    pub layers: usize,
    pub in_use: usize,
    pub disk_bytes: u64,
    pub max_bytes: u64,
}

impl LayerStore {
    /// Opens (creating) the store at `dir`: sealed layers are adopted with
    /// their recorded users, unfinished builds are removed.
    pub fn open(dir: PathBuf, max_bytes: u64) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(&dir)?;
        // The trees hold canonical ids (host uid 1000 = the sandboxes'
        // `user`): no host user may reach them.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let mut layers = HashMap::new();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let info = std::fs::read(path.join(INFO))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<LayerInfo>(&bytes).ok());
            let Some(info) = info.filter(|info| !layers.contains_key(&info.key)) else {
                tracing::info!(dir = %path.display(), "removing an unfinished volume layer");
                if let Err(e) = sandbox_runtime::remove_tree(&path) {
                    tracing::warn!(dir = %path.display(), error = %e, "cannot remove layer");
                }
                continue;
            };
            let users: HashSet<String> = std::fs::read_dir(path.join(USERS))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            let layer = Layer {
                key: info.key.clone(),
                volume_id: info.volume_id.clone(),
                dir: path,
                state: watch::Sender::new(State::Ready(info.clone())),
                users: Mutex::new(users),
                last_used: Mutex::new(Instant::now()),
                doomed: AtomicBool::new(false),
            };
            layers.insert(info.key, Arc::new(layer));
        }
        Ok(Arc::new(LayerStore {
            dir,
            max_bytes,
            layers: Mutex::new(layers),
        }))
    }

    /// The layer of `volume_id` at `sha256`, for `sandbox_id`: shared if
    /// sealed, awaited if being built, else to be built by the caller.
    pub async fn claim(
        self: &Arc<Self>,
        volume_id: &str,
        sha256: &str,
        sandbox_id: &str,
    ) -> io::Result<Claim> {
        let key = layer_key(volume_id, sha256)?;
        loop {
            let mut building = {
                let mut layers = self.layers.lock().unwrap();
                match layers.get(&key) {
                    Some(layer) if layer.doomed.load(Ordering::SeqCst) => {
                        return Ok(Claim::Failed(format!("volume {volume_id} was deleted")));
                    }
                    Some(layer) => {
                        if let Some(info) = layer.ready() {
                            layer.add_user(sandbox_id)?;
                            metrics::counter!("volume_layer_shares_total").increment(1);
                            return Ok(Claim::Share {
                                dir: layer.dir.clone(),
                                info,
                            });
                        }
                        layer.state.subscribe()
                    }
                    _ => {
                        let layer = Arc::new(Layer {
                            key: key.clone(),
                            volume_id: volume_id.to_string(),
                            dir: self
                                .dir
                                .join(format!("{key}.{:016x}", rand::random::<u64>())),
                            state: watch::Sender::new(State::Building),
                            users: Mutex::default(),
                            last_used: Mutex::new(Instant::now()),
                            doomed: AtomicBool::new(false),
                        });
                        std::fs::create_dir(&layer.dir)?;
                        layers.insert(key.clone(), layer.clone());
                        metrics::counter!("volume_layer_builds_total").increment(1);
                        return Ok(Claim::Build(LayerBuild {
                            store: self.clone(),
                            layer,
                            finished: false,
                        }));
                    }
                }
            };
            let settled = building
                .wait_for(|state| !matches!(state, State::Building))
                .await
                .map(|state| state.clone());
            match settled {
                Ok(State::Failed(why)) => return Ok(Claim::Failed(why)),
                // Sealed: go round again to register as a user.
                Ok(_) => continue,
                Err(_) => return Ok(Claim::Failed("the layer build was abandoned".into())),
            }
        }
    }

    /// A failed build: waiters see `why`, the next claim builds afresh.
    fn abandon(&self, layer: &Arc<Layer>, why: String) {
        tracing::warn!(key = %layer.key, error = %why, "volume layer build failed");
        layer.state.send_replace(State::Failed(why));
        {
            let mut layers = self.layers.lock().unwrap();
            if layers
                .get(&layer.key)
                .is_some_and(|l| Arc::ptr_eq(l, layer))
            {
                layers.remove(&layer.key);
            }
        }
        remove_in_background(layer.dir.clone());
    }

    /// `sandbox_id` no longer mounts layer `key` (a share that failed).
    pub async fn drop_user(&self, key: &str, sandbox_id: &str) {
        let layer = self.layers.lock().unwrap().get(key).cloned();
        if let Some(layer) = layer {
            layer.remove_user(sandbox_id);
        }
        self.evict().await;
    }

    /// `sandbox_id` is gone: it mounts nothing any more.
    pub async fn release(&self, sandbox_id: &str) {
        let layers: Vec<Arc<Layer>> = self.layers.lock().unwrap().values().cloned().collect();
        let mut released = false;
        for layer in layers {
            released |= layer.remove_user(sandbox_id);
        }
        if released {
            self.evict().await;
        }
    }

    /// After a restart: users that are not among `live` sandboxes are gone.
    pub async fn retain_users(&self, live: &HashSet<String>) {
        let layers: Vec<Arc<Layer>> = self.layers.lock().unwrap().values().cloned().collect();
        for layer in layers {
            let gone: Vec<String> = layer
                .users
                .lock()
                .unwrap()
                .iter()
                .filter(|user| !live.contains(*user))
                .cloned()
                .collect();
            for user in gone {
                layer.remove_user(&user);
            }
        }
        self.evict().await;
    }

    /// A deleted volume: its layers go now if unused, else with their last
    /// user. Running sandboxes keep their copies.
    pub async fn forget_volume(&self, volume_id: &str) {
        for layer in self.layers.lock().unwrap().values() {
            if layer.volume_id == volume_id {
                layer.doomed.store(true, Ordering::SeqCst);
            }
        }
        self.evict().await;
    }

    /// Dooms the layers of every volume not in `live`; returns how many.
    pub async fn retain_volumes(&self, live: &HashSet<String>) -> usize {
        let mut doomed = 0;
        for layer in self.layers.lock().unwrap().values() {
            if !live.contains(&layer.volume_id) && !layer.doomed.swap(true, Ordering::SeqCst) {
                doomed += 1;
            }
        }
        self.evict().await;
        doomed
    }

    /// Volumes with a sealed layer here (what placement prefers).
    pub fn held_volumes(&self) -> Vec<String> {
        let layers = self.layers.lock().unwrap();
        let mut held: Vec<String> = layers
            .values()
            .filter(|l| l.ready().is_some() && !l.doomed.load(Ordering::SeqCst))
            .map(|l| l.volume_id.clone())
            .collect();
        held.sort();
        held.dedup();
        held
    }

    pub fn stats(&self) -> LayerStats {
        let layers = self.layers.lock().unwrap();
        let ready: Vec<(LayerInfo, bool)> = layers
            .values()
            .filter_map(|l| l.ready().map(|info| (info, !l.idle())))
            .collect();
        LayerStats {
            layers: ready.len(),
            in_use: ready.iter().filter(|(_, used)| *used).count(),
            disk_bytes: ready.iter().map(|(info, _)| info.disk_bytes).sum(),
            max_bytes: self.max_bytes,
        }
    }

    /// Removes doomed layers nobody uses, then idle layers (oldest use
    /// first) until the sealed ones fit the budget.
    async fn evict(&self) {
        let victims: Vec<Arc<Layer>> = {
            let mut layers = self.layers.lock().unwrap();
            let mut victims: Vec<Arc<Layer>> = Vec::new();
            let removable = |l: &Layer| l.ready().is_some() && l.idle();
            layers.retain(|_, layer| {
                let remove = layer.doomed.load(Ordering::SeqCst) && removable(layer);
                if remove {
                    victims.push(layer.clone());
                }
                !remove
            });
            let mut total: u64 = layers
                .values()
                .filter_map(|l| l.ready().map(|info| info.disk_bytes))
                .sum();
            let mut idle: Vec<(Instant, String, u64)> = layers
                .values()
                .filter(|l| removable(l))
                .map(|l| {
                    let size = l.ready().map_or(0, |info| info.disk_bytes);
                    (*l.last_used.lock().unwrap(), l.key.clone(), size)
                })
                .collect();
            idle.sort();
            for (_, key, size) in idle {
                if total <= self.max_bytes {
                    break;
                }
                if let Some(layer) = layers.remove(&key) {
                    total -= size;
                    victims.push(layer);
                }
            }
            metrics::gauge!("volume_layer_disk_bytes").set(total as f64);
            victims
        };
        for layer in victims {
            tracing::info!(key = %layer.key, doomed = layer.doomed.load(Ordering::SeqCst), "removing volume layer");
            metrics::counter!("volume_layer_evictions_total").increment(1);
            let dir = layer.dir.clone();
            let _ = tokio::task::spawn_blocking(move || remove_layer_dir(&dir)).await;
        }
    }
}

/// `VOLUME_ID-SHA256`, refused unless both are path-safe.
fn layer_key(volume_id: &str, sha256: &str) -> io::Result<String> {
    let safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if safe(volume_id) && safe(sha256) {
        Ok(format!("{volume_id}-{sha256}"))
    } else {
        Err(io::Error::other(format!(
            "volume {volume_id:?} has no usable layer key"
        )))
    }
}

fn remove_in_background(dir: PathBuf) {
    tokio::task::spawn_blocking(move || remove_layer_dir(&dir));
}

fn remove_layer_dir(dir: &Path) {
    match sandbox_runtime::remove_tree(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove volume layer"),
    }
}

/// Bytes allocated under `dir` (hard links counted once per visit; a layer
/// has none).
fn disk_usage(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef";

    async fn build(store: &Arc<LayerStore>, volume: &str, sandbox: &str, bytes: usize) {
        let Claim::Build(build) = store.claim(volume, SHA, sandbox).await.unwrap() else {
            panic!("expected to build {volume}");
        };
        std::fs::write(build.dir().join("data"), vec![1u8; bytes]).unwrap();
        build.succeed(sandbox, 1, bytes as u64, 0).await.unwrap();
    }

    fn layer_dirs(root: &Path) -> usize {
        std::fs::read_dir(root).unwrap().count()
    }

    #[tokio::test]
    async fn concurrent_claims_wait_for_one_build_then_share() {
        let root = tempfile::tempdir().unwrap();
        let store = LayerStore::open(root.path().join("layers"), 1 << 30).unwrap();
        let Claim::Build(build) = store.claim("vol-a", SHA, "sbx-0").await.unwrap() else {
            panic!("first claim builds");
        };
        let waiters: Vec<_> = (1..=5)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.claim("vol-a", SHA, &format!("sbx-{i}")).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "waiters wait");
        std::fs::write(build.dir().join("file"), b"x").unwrap();
        let dir = build.dir().to_path_buf();
        build.succeed("sbx-0", 1, 1, 0).await.unwrap();
        for waiter in waiters {
            match waiter.await.unwrap().unwrap() {
                Claim::Share { dir: shared, info } => {
                    assert_eq!(shared, dir);
                    assert_eq!(info.files, 1);
                }
                _ => panic!("waiters share the built layer"),
            }
        }
        assert_eq!(store.stats().in_use, 1);
        assert_eq!(std::fs::read_dir(dir.join(USERS)).unwrap().count(), 6);
    }

    #[tokio::test]
    async fn a_failed_build_fails_its_waiters_and_the_next_claim_rebuilds() {
        let root = tempfile::tempdir().unwrap();
        let store = LayerStore::open(root.path().join("layers"), 1 << 30).unwrap();
        let Claim::Build(build) = store.claim("vol-a", SHA, "sbx-0").await.unwrap() else {
            panic!("first claim builds");
        };
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.claim("vol-a", SHA, "sbx-1").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        build.fail("corrupt archive".into());
        match waiter.await.unwrap().unwrap() {
            Claim::Failed(why) => assert_eq!(why, "corrupt archive"),
            _ => panic!("the waiter sees the failure"),
        }
        // Dropping a build unfinished fails it too.
        match store.claim("vol-a", SHA, "sbx-2").await.unwrap() {
            Claim::Build(build) => drop(build),
            _ => panic!("after a failure the next claim builds again"),
        }
        assert!(matches!(
            store.claim("vol-a", SHA, "sbx-3").await.unwrap(),
            Claim::Build(_)
        ));
    }

    #[tokio::test]
    async fn eviction_is_lru_and_spares_layers_in_use() {
        let root = tempfile::tempdir().unwrap();
        let layers = root.path().join("layers");
        // Room for about two 64 KiB layers.
        let store = LayerStore::open(layers.clone(), 150 << 10).unwrap();
        build(&store, "vol-a", "sbx-a", 64 << 10).await;
        build(&store, "vol-b", "sbx-b", 64 << 10).await;
        store.release("sbx-a").await;
        store.release("sbx-b").await;
        assert_eq!(store.stats().layers, 2, "both fit");
        // A third: the least recently used idle one (a) goes.
        build(&store, "vol-c", "sbx-c", 64 << 10).await;
        assert_eq!(store.held_volumes(), vec!["vol-b", "vol-c"]);
        // All in use: over budget, nothing is removed.
        let _ = store.claim("vol-b", SHA, "sbx-b2").await.unwrap();
        build(&store, "vol-d", "sbx-d", 64 << 10).await;
        assert_eq!(store.held_volumes(), vec!["vol-b", "vol-c", "vol-d"]);
        assert!(store.stats().disk_bytes > 150 << 10);
        // c is used only by sbx-c: once released, it is the one to go.
        store.release("sbx-c").await;
        assert_eq!(store.held_volumes(), vec!["vol-b", "vol-d"]);
        tokio::task::yield_now().await;
    }

    #[tokio::test]
    async fn deleted_volumes_go_with_their_last_user_and_restarts_keep_users() {
        let root = tempfile::tempdir().unwrap();
        let layers = root.path().join("layers");
        let store = LayerStore::open(layers.clone(), 1 << 30).unwrap();
        build(&store, "vol-a", "sbx-1", 10).await;
        let Claim::Share { .. } = store.claim("vol-a", SHA, "sbx-2").await.unwrap() else {
            panic!("sealed layers are shared");
        };
        // An unfinished build left behind by a crash.
        let Claim::Build(partial) = store.claim("vol-b", SHA, "sbx-3").await.unwrap() else {
            panic!("builds");
        };
        std::mem::forget(partial);
        drop(store);

        let store = LayerStore::open(layers.clone(), 1 << 30).unwrap();
        assert_eq!(store.held_volumes(), vec!["vol-a"], "sealed adopted");
        assert_eq!(layer_dirs(&layers), 1, "the partial build is removed");
        assert_eq!(store.stats().in_use, 1, "its users are remembered");
        store.retain_users(&["sbx-2".to_string()].into()).await;
        store.forget_volume("vol-a").await;
        assert_eq!(layer_dirs(&layers), 1, "still mounted by sbx-2");
        assert!(
            matches!(
                store.claim("vol-a", SHA, "sbx-9").await.unwrap(),
                Claim::Failed(_)
            ),
            "a deleted volume's layer is never shared again"
        );
        store.release("sbx-2").await;
        assert!(store.held_volumes().is_empty());
        assert_eq!(layer_dirs(&layers), 0, "gone with its last user");
    }

    #[test]
    fn keys_are_path_safe() {
        assert!(layer_key("vol-1", SHA).is_ok());
        assert!(layer_key("../x", SHA).is_err());
        assert!(layer_key("vol-1", "a/b").is_err());
    }
}
