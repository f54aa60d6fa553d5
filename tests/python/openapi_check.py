"""Checks every answer the Declaw SDK got in this test session against the
server's OpenAPI document: the operation and status must be documented, and
a JSON body must match the documented schema."""

import json
import re
import subprocess

from jsonschema import Draft202012Validator


class Recorder:
    """Wraps httpx's send (the transport under the Declaw SDK) to keep what
    each response was: method, path, status, content type and JSON body."""

    def __init__(self):
        self.records = []

    def install(self, monkeypatch):
        import httpx

        recorder = self

        def wrap(send):
            def sync_send(client, request, *args, **kwargs):
                response = send(client, request, *args, **kwargs)
                recorder._keep(request, response, stream=kwargs.get("stream", False))
                return response

            return sync_send

        def wrap_async(send):
            async def async_send(client, request, *args, **kwargs):
                response = await send(client, request, *args, **kwargs)
                recorder._keep(request, response, stream=kwargs.get("stream", False))
                return response

            return async_send

        monkeypatch.setattr(httpx.Client, "send", wrap(httpx.Client.send))
        monkeypatch.setattr(httpx.AsyncClient, "send", wrap_async(httpx.AsyncClient.send))

    def _keep(self, request, response, stream):
        content_type = response.headers.get("content-type", "").split(";")[0]
        body = None
        if content_type == "application/json" and not stream:
            try:
                body = json.loads(response.content)
            except Exception:  # not read yet, or not JSON: status only
                body = None
        self.records.append((request.method, request.url.path, response.status_code, content_type, body))


def _template_regex(template):
    return re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$")


def check(binary, records):
    """Problems found (empty when every record conforms) and a summary."""
    document = json.loads(subprocess.run([binary, "openapi"], check=True, capture_output=True, text=True).stdout)
    templates = sorted(document["paths"], key=lambda t: t.count("{"))  # literal paths first
    compiled = [(t, _template_regex(t)) for t in templates]
    problems, bodies, operations = [], 0, set()
    for method, path, status, content_type, body in records:
        template = next((t for t, rx in compiled if rx.match(path) and method.lower() in document["paths"][t]), None)
        if template is None:
            problems.append(f"{method} {path}: no documented operation")
            continue
        operations.add((method, template))
        responses = document["paths"][template][method.lower()]["responses"]
        documented = responses.get(str(status))
        if documented is None:
            problems.append(f"{method} {template}: status {status} is not documented ({sorted(responses)})")
            continue
        if body is None:
            continue
        schema = documented.get("content", {}).get("application/json", {}).get("schema")
        if schema is None:
            problems.append(f"{method} {template} {status}: JSON answered where none is documented")
            continue
        root = dict(schema, components=document["components"])
        errors = sorted(Draft202012Validator(root).iter_errors(body), key=lambda e: list(e.path))
        for error in errors[:3]:
            where = "/".join(map(str, error.path)) or "(body)"
            problems.append(f"{method} {template} {status}: {where}: {error.message}")
        bodies += 1
    summary = f"openapi: {len(records)} SDK responses over {len(operations)} operations, {bodies} JSON bodies validated"
    return problems, summary
