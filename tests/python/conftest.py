"""Fixtures that run the real sandbox-manager binary for the Declaw SDK tests.

The server runs against a fresh Postgres database and the local Garage, as in
the Rust black-box tests. The SDK reads DECLAW_DOMAIN / DECLAW_API_KEY, so each
test points them at the server it starts.
"""

import io
import os
import random
import shutil
import tarfile
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import openapi_check

REPO = Path(__file__).resolve().parents[2]


def make_targz(files: dict) -> bytes:
    """A gzip-compressed tar holding `files` (name → bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _binary() -> str:
    explicit = os.environ.get("SANDBOX_MANAGER_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return str(target / "debug" / "sandbox-manager")


def _garage_env() -> dict:
    out = subprocess.run(
        ["bash", str(REPO / "scripts/garage.sh"), "env"], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _fresh_database() -> str:
    subprocess.run(["bash", str(REPO / "scripts/postgres.sh")], check=True)
    admin = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    name = "sdk_test_%016x" % random.getrandbits(64)
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    return admin.rsplit("/", 1)[0] + "/" + name


TEMPLATES_DIR = os.environ.get("SANDBOX_TEMPLATES_DIR", "/var/tmp/sandbox-manager-templates")
IMAGES_DIR = os.environ.get("SANDBOX_IMAGES_DIR", "/var/tmp/sandbox-manager-images")
# The sandbox runtime under test; scripts/test.sh runs the SDK suite on both.
RUNTIME = os.environ.get("SANDBOX_TEST_RUNTIME", "namespace")


def _sandbox_settings() -> dict:
    for template in ("base", "python"):
        subprocess.run(
            [_binary(), "templates", "build", template],
            check=True, env=dict(os.environ, SANDBOX_MANAGER__RUNTIME__TEMPLATES_DIR=TEMPLATES_DIR, RUST_LOG="warn"),
        )
    settings = {"runtime.kind": RUNTIME}
    if RUNTIME == "microvm":
        # Kernel, images and snapshots, shared with the Rust suites.
        settings["runtime.microvm.images_dir"] = IMAGES_DIR
        subprocess.run(
            [_binary(), "images", "build"],
            check=True,
            env=dict(os.environ, RUST_LOG="warn", **{
                "SANDBOX_MANAGER__RUNTIME__KIND": "microvm",
                "SANDBOX_MANAGER__RUNTIME__TEMPLATES_DIR": TEMPLATES_DIR,
                "SANDBOX_MANAGER__RUNTIME__MICROVM__IMAGES_DIR": IMAGES_DIR,
            }),
        )
    return {
        **settings,
        "runtime.templates_dir": TEMPLATES_DIR,
        "runtime.build_templates_on_start": "false",
        "pool.sizes.base": "2",
        "pool.sizes.python": "2",
    }


class Server:
    def __init__(self, settings: dict):
        settings = dict(settings)
        if settings.pop("sandboxes", False):
            if os.geteuid() != 0:
                pytest.skip("SKIP: sandboxes need root")
            if RUNTIME == "microvm" and not shutil.which("qemu-system-x86_64"):
                pytest.skip("SKIP: microvm runtime needs qemu-system-x86_64 (scripts/microvm-deps.sh)")
            settings = {**_sandbox_settings(), **settings}
        else:
            settings.setdefault("runtime.kind", "disabled")
        self.data_dir = tempfile.TemporaryDirectory()
        garage = _garage_env()
        config = Path(self.data_dir.name) / "config.toml"
        config.write_text(
            f'listen = "127.0.0.1:0"\ndata_dir = "{self.data_dir.name}"\n'
            f'[database]\nurl = "{_fresh_database()}"\n'
            f'[blobs]\nbackend = "s3"\n'
            f'[blobs.s3]\nendpoint = "{garage["S3_ENDPOINT"]}"\nregion = "{garage["S3_REGION"]}"\n'
            f'bucket = "{garage["S3_BUCKET"]}"\naccess_key_id = "{garage["AWS_ACCESS_KEY_ID"]}"\n'
            f'secret_access_key = "{garage["AWS_SECRET_ACCESS_KEY"]}"\n'
        )
        self.config = str(config)
        env = dict(os.environ, RUST_LOG="info")
        for key, value in settings.items():
            env["SANDBOX_MANAGER__" + key.replace(".", "__").upper()] = str(value)
        self.env = env
        self.log = open(Path(self.data_dir.name) / "server.log", "w")
        self.proc = subprocess.Popen(
            [_binary(), "serve", "--config", self.config],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self.address = None
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.address = line.split(" ", 2)[2].strip()
                break
        assert self.address, "server did not start: " + (Path(self.data_dir.name) / "server.log").read_text()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.api_key = (Path(self.data_dir.name) / "api-key").read_text().strip()

    def create_key(self, owner: str) -> str:
        out = subprocess.run(
            [_binary(), "keys", "create", "--owner", owner, "--config", self.config],
            check=True, capture_output=True, text=True, env=self.env,
        ).stdout
        return out.strip().splitlines()[-1]

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        # Sandboxes outlive a killed server by design (it re-adopts them);
        # this one never comes back, so its machines (QEMU, relays,
        # launchers) go with it.
        _kill_processes_mentioning(self.data_dir.name)
        _kill_sandbox_cgroups(Path(self.data_dir.name) / "sandboxes")
        # Custom template builds go with the data dir; their microVM images
        # in the shared images dir are keyed by the build's name.
        builds = Path(self.data_dir.name) / "builds"
        for build in builds.iterdir() if builds.is_dir() else []:
            shutil.rmtree(Path(IMAGES_DIR) / "templates" / build.name, ignore_errors=True)
        self.log.close()
        self.data_dir.cleanup()


def _kill_sandbox_cgroups(state_dir: Path) -> None:
    """A namespace sandbox's envd is its PID 1 and does not name the state
    directory, so it survives its killed launcher: kill by cgroup."""
    try:
        ids = [f"/sandbox-manager/{name}\n" for name in os.listdir(state_dir)]
    except OSError:
        return
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                cgroups = f.read()
        except OSError:
            continue
        if any(i in cgroups for i in ids):
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass


def _kill_processes_mentioning(path: str) -> None:
    for _ in range(2):  # a second pass catches a QEMU that was daemonizing
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if path in cmdline and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 9)
                except OSError:
                    pass
        time.sleep(0.2)


_recorder = openapi_check.Recorder()


@pytest.fixture(scope="session", autouse=True)
def openapi_conformance():
    """Every answer the SDK gets in this session must match /openapi.json."""
    with pytest.MonkeyPatch.context() as patch:
        _recorder.install(patch)
        yield
    if not _recorder.records:
        pytest.fail("openapi: no SDK response was recorded; is the SDK still on httpx?")
    problems, summary = openapi_check.check(_binary(), _recorder.records)
    print("\n" + summary)
    assert not problems, "answers that do not match the OpenAPI document:\n" + "\n".join(problems)


@pytest.fixture
def server_factory(monkeypatch):
    started = []

    def start(**settings) -> Server:
        server = Server(settings)
        started.append(server)
        monkeypatch.setenv("DECLAW_DOMAIN", server.address)
        monkeypatch.setenv("DECLAW_API_KEY", server.api_key)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory):
    return server_factory()
