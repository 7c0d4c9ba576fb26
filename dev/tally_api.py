"""HTTP helpers the cluster suite's scripts share: the admin token of a stack script, and one
JSON call to a Tally service."""

import json
import subprocess
import urllib.error
import urllib.request


def admin_token(script):
    """TALLY_ADMIN_TOKEN as `bash SCRIPT env` prints it (dev/stack.sh or dev/cluster.sh)."""
    out = subprocess.run(["bash", script, "env"], check=True, capture_output=True, text=True).stdout
    return next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("TALLY_ADMIN_TOKEN="))


def call(method, url, token=None, key=None, body=None, timeout=60):
    """(status, decoded JSON body) of one request; 4xx/5xx answers are returned, not raised."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if key:
        headers["X-API-Key"] = key
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
