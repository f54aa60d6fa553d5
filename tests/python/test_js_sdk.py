"""The Declaw JS SDK (@declaw/sdk 1.3.0, pinned in tests/js/package.json)
against the same server: node's test runner drives tests/js/*.test.mjs."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO

JS = REPO / "tests" / "js"
# What @declaw/sdk 1.3.0 declares in its package.json "engines".
NODE_MIN = (20, 18, 1)


def node_version():
    node = shutil.which("node")
    if node is None:
        return None
    out = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    match = re.match(r"v(\d+)\.(\d+)\.(\d+)", out.strip())
    return tuple(int(p) for p in match.groups()) if match else None


@pytest.fixture(scope="module")
def js_sdk():
    version = node_version()
    if version is None or version < NODE_MIN:
        pytest.skip(f"SKIP: the JS SDK needs Node.js >= {NODE_MIN}, found {version}")
    installed = JS / "node_modules" / "@declaw" / "sdk" / "package.json"
    if not installed.exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=JS, check=True, timeout=300
        )
    return JS


def test_js_sdk_write_back_pause_metrics_pty(js_sdk, server_factory):
    server_factory(sandboxes=True)
    result = subprocess.run(
        ["node", "--test", "--test-reporter=spec", "phase2.test.mjs"],
        cwd=js_sdk,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"pass 5\b", result.stdout), result.stdout[-2000:]
