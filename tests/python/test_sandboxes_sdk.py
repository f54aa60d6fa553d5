"""Sandboxes, commands, files and the product page's volume walkthrough
through the real, unmodified Declaw Python SDK (1.7.0)."""

import os
import subprocess
import sys

import pytest
from declaw import Sandbox, Volumes
from declaw.exceptions import AuthenticationException, InvalidArgumentException, NotFoundException

from conftest import REPO, make_targz

# The product page's program, unchanged, as the README tells users to run it.
SEED_PROGRAM = (REPO / "examples" / "volumes_fanout.py").read_text()


@pytest.fixture
def sandbox_server(server_factory):
    return server_factory(sandboxes=True)


def test_seed_program_runs_unchanged(sandbox_server, tmp_path):
    rows = "".join(f"{i},{i * i}\n" for i in range(4242))
    (tmp_path / "training.tar.gz").write_bytes(make_targz({"rows.csv": rows.encode()}))
    (tmp_path / "seed.py").write_text(SEED_PROGRAM)
    result = subprocess.run(
        [sys.executable, "seed.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"sandbox {i}: 4242 /data/rows.csv" for i in range(4)]
    assert Volumes.list() == []
    assert Sandbox.list()["sandboxes"] == []


def test_python_template_runs_python(sandbox_server):
    sbx = Sandbox.create(template="python")
    try:
        result = sbx.commands.run("python3 -c 'print(1+1)'")
        assert result.stdout == "2\n"
        assert result.exit_code == 0
        failed = sbx.commands.run("python3 -c 'import sys; sys.exit(3)'")
        assert failed.exit_code == 3
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "tpl-python"
        assert sbx.is_running()
    finally:
        sbx.kill()
    assert not Sandbox.connect(sbx.sandbox_id).is_running()


def test_commands_background_stream_and_files(sandbox_server):
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        handle = sbx.commands.run("sleep 0.2; echo done", background=True)
        waited = handle.wait()
        assert waited.stdout.strip() == "done"

        seen = []
        streamed = sbx.commands.run("echo one; echo two", on_stdout=lambda line: seen.append(line))
        assert streamed.exit_code == 0
        assert "one" in "".join(seen) and "two" in "".join(seen)

        info = sbx.files.write("/home/user/notes/hello.txt", "hi there")
        assert info.path == "/home/user/notes/hello.txt"
        assert sbx.files.read("/home/user/notes/hello.txt") == "hi there"
        assert sbx.files.exists("/home/user/notes/hello.txt")
        names = [e.name for e in sbx.files.list("/home/user/notes")]
        assert names == ["hello.txt"]
        sbx.files.make_dir("/home/user/empty")
        sbx.files.rename("/home/user/notes/hello.txt", "/home/user/moved.txt")
        assert not sbx.files.exists("/home/user/notes/hello.txt")
        sbx.files.remove("/home/user/moved.txt")
        assert not sbx.files.exists("/home/user/moved.txt")
        with pytest.raises(NotFoundException):
            sbx.files.read("/home/user/missing.txt")
        sbx.set_timeout(600)
    finally:
        sbx.kill()


def test_attach_errors(sandbox_server):
    vol = Volumes.create(name="v", data=make_targz({"a": b"a"}))
    from declaw import VolumeAttachment

    with pytest.raises(InvalidArgumentException):
        Sandbox.create(volumes=[VolumeAttachment(volume_id=vol.volume_id, mount_path="/etc")])
    Volumes.delete(vol.volume_id)
    with pytest.raises(AuthenticationException):
        Sandbox.create(volumes=[VolumeAttachment(volume_id=vol.volume_id, mount_path="/data")])
