//! envd as PID 1 of a microVM: the few things an init must do before the
//! agent can serve (mounts, loopback and the user-mode network), the
//! virtio-serial port the host reaches us through, and the one-time
//! `POST /init` hand-over (token, clock, entropy, hostname).
//!
//! The guest network is QEMU's user-mode (slirp) network, whose addresses
//! are fixed by QEMU: guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use envd_protocol::mux::{read_frame, Frame, FrameKind, MAX_PAYLOAD};
use std::collections::HashMap;
use tokio::io::unix::AsyncFd;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, WriteHalf,
};
use tokio::sync::mpsc;

const GUEST_ADDRESS: [u8; 4] = [10, 0, 2, 15];
const GUEST_NETMASK: [u8; 4] = [255, 255, 255, 0];
const GATEWAY: [u8; 4] = [10, 0, 2, 2];
const RESOLV_CONF: &str = "nameserver 10.0.2.3\n";
/// Bytes buffered per session in each direction inside the guest.
const SESSION_BUFFER: usize = 256 * 1024;
/// Printed on the console once the agent waits for the host: the host
/// snapshots a template VM right after seeing it.
pub const READY_MARKER: &str = "ENVD-READY";

/// Mounts, network and environment of a VM's init. Runs before any thread
/// exists (it edits the environment).
pub fn init_system() -> anyhow::Result<()> {
    // The kernel hands init a few variables of its own (TERM, BOOT_IMAGE,
    // …); sandboxes start from the same clean set as the namespace driver's.
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    std::env::set_var("HOME", "/root");
    mount_fs(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount_fs(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    // CONFIG_DEVTMPFS_MOUNT may have mounted it already.
    if !Path::new("/dev/null").exists() {
        mount_fs("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    }
    for dir in ["/dev/pts", "/dev/shm", "/run", "/tmp"] {
        let _ = std::fs::create_dir_all(dir);
    }
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    set_mode("/tmp", 0o1777)?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    interface_up("lo", None)?;
    if Path::new("/sys/class/net/eth0").exists() {
        interface_up("eth0", Some((GUEST_ADDRESS, GUEST_NETMASK)))?;
        default_route(GATEWAY)?;
        std::fs::write("/etc/resolv.conf", RESOLV_CONF)?;
    }
    Ok(())
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> anyhow::Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (source_c, target_c, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: valid NUL-terminated strings.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EBUSY) {
            anyhow::bail!("mounting {fstype} on {target}: {error}");
        }
    }
    Ok(())
}

fn set_mode(path: &str, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in(address: [u8; 4]) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: all-zero is a valid ifreq.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

fn ioctl<T>(fd: &OwnedFd, request: libc::Ioctl, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: `arg` is the structure this request expects.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) } != 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("{what}: {error}")));
    }
    Ok(())
}

fn interface_up(name: &str, address: Option<([u8; 4], [u8; 4])>) -> io::Result<()> {
    let socket = control_socket()?;
    if let Some((address, netmask)) = address {
        let mut request = ifreq(name);
        request.ifr_ifru.ifru_addr = sockaddr_in(address);
        ioctl(
            &socket,
            libc::SIOCSIFADDR,
            &mut request,
            "setting the address",
        )?;
        let mut request = ifreq(name);
        request.ifr_ifru.ifru_netmask = sockaddr_in(netmask);
        ioctl(
            &socket,
            libc::SIOCSIFNETMASK,
            &mut request,
            "setting the netmask",
        )?;
    }
    let mut request = ifreq(name);
    ioctl(
        &socket,
        libc::SIOCGIFFLAGS,
        &mut request,
        "reading interface flags",
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        &socket,
        libc::SIOCSIFFLAGS,
        &mut request,
        "bringing the interface up",
    )
}

fn default_route(gateway: [u8; 4]) -> io::Result<()> {
    let socket = control_socket()?;
    // SAFETY: all-zero is a valid rtentry.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in([0; 4]);
    route.rt_genmask = sockaddr_in([0; 4]);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(
        &socket,
        libc::SIOCADDRT,
        &mut route,
        "adding the default route",
    )
}

/// `/dev/vportNpM` of the virtio-serial port named `name`.
pub fn find_virtio_port(name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name:?}"),
    ))
}

/// One virtio-serial port, non-blocking, as a tokio byte stream. Clones
/// share the fd, so one task can read while another writes.
///
/// The host side is a relay that connects before the guest boots and stays
/// for the VM's life (see `envd_protocol::mux`): the guest kernel does not
/// reliably learn about a host that connects after the port was opened, so
/// host connections are sessions inside the stream, never reconnections.
#[derive(Clone)]
pub struct VirtioPort {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl VirtioPort {
    pub fn open(path: &Path) -> io::Result<Self> {
        let path_c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        // SAFETY: valid path; the fd is owned right away.
        let fd = unsafe {
            libc::open(
                path_c.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by the OwnedFd, which
        // the AsyncFd keeps (and never swaps) until it is dropped.
        let fd = unsafe { AsyncFd::register(OwnedFd::from_raw_fd(fd)) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd: Arc::new(fd) })
    }
}

fn read_fd(fd: &AsyncFd<OwnedFd>, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for VirtioPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| read_fd(fd, unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VirtioPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let result = guard.try_io(|fd| {
                // SAFETY: the data is valid for its length.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves every session the host opens on the port until the stream ends.
/// Each session is an in-memory pipe with an ordinary HTTP connection on
/// the far end (`serve`), so sessions run concurrently and independently.
pub async fn serve_sessions<F>(port: VirtioPort, serve: F) -> io::Result<()>
where
    F: Fn(DuplexStream),
{
    let (frames, mut outgoing) = mpsc::channel::<Frame>(64);
    let mut writer = port.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if let Err(error) = writer.write_all(&frame.encode()).await {
                tracing::warn!(%error, "writing to the host failed");
                return;
            }
        }
    });
    let mut reader = port;
    let mut sessions: HashMap<u32, WriteHalf<DuplexStream>> = HashMap::new();
    let result = loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        let id = frame.session;
        match frame.kind {
            FrameKind::Open => {
                tracing::debug!(session = id, "host session opened");
                let (ours, theirs) = tokio::io::duplex(SESSION_BUFFER);
                let (mut from_server, to_server) = tokio::io::split(ours);
                sessions.insert(id, to_server);
                serve(theirs);
                let frames = frames.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; MAX_PAYLOAD];
                    loop {
                        match from_server.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let data = Bytes::copy_from_slice(&buffer[..n]);
                                if frames.send(Frame::data(id, data)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = frames.send(Frame::close(id)).await;
                });
            }
            FrameKind::Data => {
                if let Some(to_server) = sessions.get_mut(&id) {
                    if to_server.write_all(&frame.payload).await.is_err() {
                        sessions.remove(&id);
                    }
                }
            }
            FrameKind::Close => {
                tracing::debug!(session = id, "host session closed");
                if let Some(mut to_server) = sessions.remove(&id) {
                    let _ = to_server.shutdown().await;
                }
            }
        }
    };
    writer_task.abort();
    result
}

/// Sets the wall clock (a restored VM's still says when its snapshot was taken).
pub fn set_clock(unix_time_ns: u64) -> io::Result<()> {
    let time = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: plain syscall with a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `seed` into the kernel's pool, credits it, and reseeds the CRNG
/// right away: clones of one snapshot start with identical CRNG state.
pub fn add_entropy(seed: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
    const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: `info` is a rand_pool_info followed by its buffer.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: valid buffer and length.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    Ok(())
}
