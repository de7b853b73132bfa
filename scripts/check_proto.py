#!/usr/bin/env python3
"""Checks proto/runcast/v1/protocol.proto with a real protoc, then checks
that every JSON frame example in docs/protocol.md parses, field for field,
as the schema message its "type" names (proto3 JSON mapping, unknown fields
rejected). Needs `pip install grpcio-tools`."""
import importlib, json, os, re, subprocess, sys, tempfile

import grpc_tools
from google.protobuf import json_format

root = os.path.join(os.path.dirname(__file__), "..")
proto_dir = os.path.join(root, "proto")
include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
out = tempfile.mkdtemp()
subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}",
     f"--python_out={out}", "runcast/v1/protocol.proto"],
    check=True,
)
sys.path.insert(0, out)
pb = importlib.import_module("runcast.v1.protocol_pb2")

messages = {
    "subscribe": pb.Subscribe, "unsubscribe": pb.Unsubscribe, "ping": pb.Ping,
    "hello": pb.Hello, "state": pb.State, "event": pb.Event, "gap": pb.Gap,
    "error": pb.Error, "unsubscribed": pb.Unsubscribed, "pong": pb.Pong,
    "auth": pb.Auth, "refresh": pb.Refresh, "authenticated": pb.Authenticated,
}

doc = open(os.path.join(root, "docs", "protocol.md")).read()
# JSON objects in code blocks and in `data:` lines of the SSE example.
candidates = []
for block in re.findall(r"```(?:json)?\n(.*?)```", doc, re.S):
    for line in block.replace("\n ", " ").splitlines():
        line = line.strip()
        if line.startswith("data: "):
            line = line[len("data: "):]
        if line.startswith("{") and '"type"' in line:
            candidates.append(line)

checked = 0
for text in candidates:
    if "..." in text:
        continue  # elided example
    frame = json.loads(text)
    kind = frame.pop("type")
    if kind not in messages:
        sys.exit(f"docs example has unknown type {kind!r}: {text}")
    json_format.Parse(json.dumps(frame), messages[kind](), ignore_unknown_fields=False)
    checked += 1

if checked < 8:
    sys.exit(f"only {checked} frame examples found in docs/protocol.md; expected more")
print(f"protocol.proto compiles; {checked} documented frames match the schema")
