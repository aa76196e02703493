#!/usr/bin/env python3
"""A stand-in for the OpenMeet platform's login page, for `make dev` only.

The sidecar sends browsers without a platform session to
GET /login?return_to=<sidecar authorize URL>. This page lists the sample
MatrixUsers; picking one mints a platform JWT with the operator binary's
`dev-token` subcommand (HS256, the stack's shared secret) and sends the
browser back by posting it, in a form, to the return address (the sidecar
never accepts a platform token in an address). It runs for `make dev` (and
in the test that checks it), never in a cluster.

It sends browsers back only to the sidecar's own authorize URL (scheme,
host, port and path of SIDECAR_URL + /authorize; any query): any other
`return_to` is refused with 400, so the page cannot be used to hand a
platform token to another site.

Usage: dev-platform.py PORT   (environment: SIDECAR_URL, OPERATOR_BIN, KUBECTL, PLATFORM_*)
"""
import html
import http.server
import json
import os
import subprocess
import sys
import urllib.parse

# The sidecar's authorize endpoint: the only place browsers are sent back to.
AUTHORIZE = urllib.parse.urlsplit(os.environ["SIDECAR_URL"].rstrip("/") + "/authorize")


def allowed_return(return_to):
    """Whether `return_to` is the sidecar's authorize URL (any query)."""
    # urlsplit drops tabs and line breaks: refuse them before it can.
    if not return_to or any(ord(c) < 0x20 or ord(c) == 0x7F for c in return_to):
        return False
    url = urllib.parse.urlsplit(return_to)
    return (
        (url.scheme, url.netloc, url.path) == (AUTHORIZE.scheme, AUTHORIZE.netloc, AUTHORIZE.path)
        and not url.fragment
    )


def users():
    out = subprocess.run(
        [os.environ["KUBECTL"], "get", "matrixusers", "-A", "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = []
    namespaces = json.loads(subprocess.run(
        [os.environ["KUBECTL"], "get", "namespaces", "-l", "matrix.openmeet.net/tenant", "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout)["items"]
    tenant_of = {n["metadata"]["name"]: n["metadata"]["labels"]["matrix.openmeet.net/tenant"] for n in namespaces}
    for u in json.loads(out)["items"]:
        subject = u["spec"].get("subject")
        tenant = tenant_of.get(u["metadata"]["namespace"])
        if subject and tenant:
            rows.append((u["spec"].get("displayName") or u["spec"]["localpart"], subject, tenant))
    return rows


class Login(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        return_to = query.get("return_to", "")
        if url.path == "/login" and not allowed_return(return_to):
            self.send_error(400, "return_to must be the sidecar's authorize URL")
            return
        if url.path == "/login" and "subject" in query:
            token = subprocess.run(
                [os.environ["OPERATOR_BIN"], "dev-token", "--subject", query["subject"], "--tenant", query["tenant"]],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            # A form the browser posts at once (and a button where scripts are off).
            body = (
                "<!doctype html><title>OpenMeet (dev)</title>"
                f'<form method="post" action="{html.escape(return_to)}">'
                f'<input type="hidden" name="platform_token" value="{html.escape(token)}">'
                "<noscript><button>Continue to chat</button></noscript></form>"
                "<script>document.forms[0].submit()</script>"
            )
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            self.wfile.write(body.encode())
            return
        if url.path != "/login":
            self.send_error(404)
            return
        links = "".join(
            '<li><a href="/login?{}">{}</a></li>'.format(
                html.escape(urllib.parse.urlencode({"subject": s, "tenant": t, "return_to": return_to})),
                html.escape(f"{name} (tenant {t})"),
            )
            for name, s, t in users()
        )
        body = f"<!doctype html><title>OpenMeet (dev)</title><h1>Sign in to OpenMeet (dev)</h1><ul>{links}</ul>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Login).serve_forever()
