// Write-back, pause/resume, metrics and terminals through the real,
// unmodified Declaw JS SDK. Run by tests/python/test_js_sdk.py, which
// starts the server and sets DECLAW_DOMAIN and DECLAW_API_KEY.
import { test } from "node:test";
import assert from "node:assert/strict";
import { gzipSync } from "node:zlib";
import { Sandbox, Volumes, ConflictError } from "@declaw/sdk";

/** A one-file tar.gz (ustar header + data, padded). */
function targz(name, text) {
  const data = Buffer.from(text);
  const header = Buffer.alloc(512);
  header.write(name, 0);
  header.write("0000644\0", 100);
  header.write("0000000\0", 108);
  header.write("0000000\0", 116);
  header.write(data.length.toString(8).padStart(11, "0") + "\0", 124);
  header.write("00000000000\0", 136);
  header.write("        ", 148);
  header.write("0", 156);
  header.write("ustar\0", 257);
  header.write("00", 263);
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(sum.toString(8).padStart(6, "0") + "\0 ", 148);
  const padded = Buffer.alloc(Math.ceil(data.length / 512) * 512);
  data.copy(padded);
  return gzipSync(Buffer.concat([header, padded, Buffer.alloc(1024)]));
}

test("commit and snapshot write back into new volumes", async () => {
  const source = await Volumes.create("data", targz("rows.csv", "1\n2\n"));
  const original = Buffer.from(await Volumes.download(source.volumeId));
  const sbx = await Sandbox.create({
    template: "base",
    volumes: [{ volumeId: source.volumeId, mountPath: "/data" }],
  });
  let committed, snap;
  try {
    const edit = await sbx.commands.run("cd /data && echo 3 >> rows.csv && mkdir out && echo r > out/r.txt");
    assert.equal(edit.exitCode, 0, edit.stderr);
    committed = await Volumes.commit(sbx.sandboxId, source.volumeId);
    assert.notEqual(committed.volumeId, source.volumeId);
    assert.equal(committed.name, "data-commit");
    snap = await Volumes.snapshot(sbx.sandboxId, "/data/out", "results");
    assert.equal(snap.name, "results");
  } finally {
    await sbx.kill();
  }
  const fresh = await Sandbox.create({
    template: "base",
    volumes: [
      { volumeId: committed.volumeId, mountPath: "/data" },
      { volumeId: snap.volumeId, mountPath: "/results" },
    ],
  });
  try {
    const seen = await fresh.commands.run("cat /data/rows.csv /results/r.txt");
    assert.equal(seen.stdout, "1\n2\n3\nr\n");
  } finally {
    await fresh.kill();
  }
  assert.deepEqual(Buffer.from(await Volumes.download(source.volumeId)), original);
  for (const v of [source, committed, snap]) await Volumes.delete(v.volumeId);
});

test("pause and resume keep the sandbox and hold the deadline; metrics move", async () => {
  const sbx = await Sandbox.create({ template: "base", timeout: 300 });
  try {
    const before = await sbx.getInfo();
    await sbx.commands.run("echo kept > /tmp/f; (while :; do :; done) &", { background: true });
    await new Promise((r) => setTimeout(r, 1000));
    const metrics = await sbx.getMetrics();
    const last = metrics[metrics.length - 1];
    assert.ok(last.cpuUsagePercent > 20, JSON.stringify(metrics));
    assert.ok(last.timestamp instanceof Date && !isNaN(last.timestamp));

    await sbx.pause();
    await assert.rejects(sbx.commands.run("true"), ConflictError);
    await new Promise((r) => setTimeout(r, 1500));
    await sbx.resume();
    const after = await sbx.getInfo();
    assert.ok(after.endAt - before.endAt >= 1500, `${before.endAt} -> ${after.endAt}`);
    assert.equal((await sbx.commands.run("cat /tmp/f")).stdout, "kept\n");
  } finally {
    await sbx.kill();
  }
});

test("a pty runs tty on a pseudo-terminal", async () => {
  const sbx = await Sandbox.create({ template: "base" });
  try {
    const chunks = [];
    const term = await sbx.pty.create({
      size: { cols: 100, rows: 30 },
      onData: (data) => chunks.push(Buffer.from(data)),
    });
    await term.sendInput("tty; stty size; exit 7\n");
    const result = await term.wait();
    const seen = Buffer.concat(chunks).toString();
    assert.match(seen, /\/dev\/pts\/\d+/);
    assert.match(seen, /30 100/);
    assert.equal(result.exitCode, 7);
  } finally {
    await sbx.kill();
  }
});

test("a template built with the SDK serves creates by its alias", async () => {
  const { Template, TemplateBase } = await import("@declaw/sdk");
  // aptInstall() is sent as `apt_packages` by this SDK version.
  const spec = new TemplateBase().aptInstall("jq").runCmd(["echo js > /opt/from-js"]);
  // Template.build in @declaw/sdk 1.3.0 answers at once; poll the status.
  let info = await Template.build(spec, "js-data");
  const deadline = Date.now() + 1_200_000;
  while (info.status === "building" && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 1000));
    info = await Template.getBuildStatus(info.buildId);
  }
  assert.equal(info.status, "completed", (info.logs ?? []).join("\n"));
  assert.ok(info.logs.some((line) => line.includes("apt-get install jq")), info.logs.join("\n"));
  const sbx = await Sandbox.create({ template: "js-data" });
  try {
    const out = await sbx.commands.run("jq -n 3; cat /opt/from-js");
    assert.equal(out.stdout, "3\njs\n");
  } finally {
    await sbx.kill();
  }
});

test("snapshot, then restore under the same id", async () => {
  const sbx = await Sandbox.create({ template: "base", timeout: 300 });
  try {
    await sbx.files.write("/home/user/state.txt", "before");
    const snap = await sbx.snapshot();
    assert.equal(snap.sandboxId, sbx.sandboxId);
    await sbx.files.write("/home/user/state.txt", "after");
    const listed = await sbx.listSnapshots();
    assert.deepEqual(listed.map((s) => s.snapshotId), [snap.snapshotId]);
    const restored = await Sandbox.restore(sbx.sandboxId, { snapshotId: snap.snapshotId });
    assert.equal(restored.sandboxId, sbx.sandboxId);
    assert.equal(await restored.files.read("/home/user/state.txt"), "before");
    assert.equal(await sbx.deleteSnapshot(snap.snapshotId), true);
  } finally {
    await sbx.kill();
  }
});
