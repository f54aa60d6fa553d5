"""Volume write-back, pause/resume and metrics through the real Declaw
Python SDK (1.7.0), on whichever runtime the suite runs."""

import time

import pytest
from declaw import Sandbox, Volumes
from declaw.exceptions import ConflictException

from conftest import make_targz


@pytest.fixture
def sandbox_server(server_factory):
    return server_factory(sandboxes=True)


def test_commit_and_snapshot_write_back_into_new_volumes(sandbox_server):
    source = Volumes.create(name="data", data=make_targz({"rows.csv": b"1\n2\n"}))
    original = Volumes.download(source.volume_id)
    sbx = Sandbox.create(template="base", volumes=[source.attach("/data")])
    try:
        edit = sbx.commands.run("cd /data && echo 3 >> rows.csv && mkdir out && echo r > out/result.txt")
        assert edit.exit_code == 0, edit.stderr
        committed = Volumes.commit(sbx.sandbox_id, source.volume_id)
        assert committed.volume_id != source.volume_id
        assert committed.name == "data-commit"
        snap = Volumes.snapshot(sbx.sandbox_id, "/data/out", name="results")
        assert snap.name == "results"
    finally:
        sbx.kill()

    fresh = Sandbox.create(template="base", volumes=[committed.attach("/data"), snap.attach("/results")])
    try:
        seen = fresh.commands.run("cat /data/rows.csv /results/result.txt")
        assert seen.stdout == "1\n2\n3\nr\n"
    finally:
        fresh.kill()
    assert Volumes.download(source.volume_id) == original, "the source is unchanged"
    again = Sandbox.create(template="base", volumes=[source.attach("/data")])
    try:
        assert again.commands.run("cat /data/rows.csv").stdout == "1\n2\n"
    finally:
        again.kill()
    for volume in (source, committed, snap):
        Volumes.delete(volume.volume_id)


def test_pause_resume_and_metrics(sandbox_server):
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        before = sbx.get_info()
        sbx.commands.run("echo kept > /tmp/f; (while :; do :; done) &", background=True)
        time.sleep(1)
        metrics = sbx.get_metrics()
        assert metrics and metrics[-1].cpu_usage_percent > 20, metrics
        assert metrics[-1].memory_usage_mb > 0

        sbx.pause()
        with pytest.raises(ConflictException):
            sbx.commands.run("true")
        time.sleep(1.5)
        sbx.resume()
        after = sbx.get_info()
        assert (after.end_at - before.end_at).total_seconds() >= 1.5
        assert sbx.commands.run("cat /tmp/f").stdout == "kept\n"
        assert sbx.is_running()
    finally:
        sbx.kill()


def test_pty_runs_tty_on_a_pseudo_terminal(sandbox_server):
    from declaw.sandbox.commands.models import PtySize

    sbx = Sandbox.create(template="base")
    try:
        chunks = []
        handle = sbx.pty.create(size=PtySize(cols=100, rows=30), on_data=chunks.append)
        handle.send_stdin("tty; stty size; exit 7\n")
        result = handle.wait(timeout=60)
        seen = b"".join(chunks).decode()
        assert "/dev/pts/" in seen, seen
        assert "30 100" in seen, seen
        assert result == 7
        other = sbx.pty.create()
        assert other.kill() is True
    finally:
        sbx.kill()


def test_template_build_then_create_from_its_alias(sandbox_server):
    from declaw import Template, TemplateBase
    from declaw.exceptions import BuildError

    seen = []
    spec = (
        TemplateBase()
        .apt_install("jq")
        .run_cmd(["echo baked > /opt/baked"])
        .set_envs({"STAGE": "sdk"})
    )
    info = Template.build(spec, alias="sdk-data", on_build_logs=seen.append, build_timeout=1200)
    assert info.status == "completed"
    assert any("apt-get install jq" in line for line in seen), seen
    sbx = Sandbox.create(template="sdk-data")
    try:
        out = sbx.commands.run("jq -n '[1,2]|length'; cat /opt/baked; echo $STAGE").stdout
        assert out == "2\nbaked\nsdk\n"
    finally:
        sbx.kill()

    broken = TemplateBase().run_cmd(["echo going down; exit 4"])
    with pytest.raises(BuildError) as failed:
        Template.build(broken, alias="sdk-broken", build_timeout=1200)
    assert "going down" in str(failed.value)
    assert "exited with 4" in str(failed.value)


def test_snapshot_and_restore(sandbox_server):
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        sbx.files.write("/home/user/state.txt", "before")
        snap = sbx.create_snapshot()
        assert snap.sandbox_id == sbx.sandbox_id
        sbx.files.write("/home/user/state.txt", "after")
        listed = sbx.list_snapshots()
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
        restored = Sandbox.restore(sbx.sandbox_id, snapshot_id=snap.snapshot_id)
        assert restored.sandbox_id == sbx.sandbox_id
        assert restored.files.read("/home/user/state.txt") == "before"
        assert sbx.delete_snapshot(snap.snapshot_id) is True
        assert sbx.list_snapshots() == []
    finally:
        sbx.kill()
