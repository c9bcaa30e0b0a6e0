"""Where the worker's time goes: a pyinstrument session summarised by package and by key function.

Used by ``bench.worker --profile``; the summary is JSON beside the text and HTML profiles. Idle time (the
event loop waiting in ``select``) is left out, so the shares are of the time the worker was busy.
"""

from __future__ import annotations

from typing import Any

PACKAGES = (
    ("calmrun decider", "/calmrun/workflow/"),
    ("calmrun codec", "/calmrun/codec.py"),
    ("calmrun codec", "/calmrun/avro.py"),
    ("calmrun codec", "/calmrun/jsonfield.py"),
    ("calmrun streams", "/calmrun/streams/"),
    ("calmrun agents", "/calmrun/agents/"),
    ("bench", "/bench/"),
    ("aiokafka", "/aiokafka/"),
    ("pydantic", "/pydantic"),
    ("fastavro", "/fastavro/"),
    ("copy (deepcopy)", "/copy.py"),
    ("asyncio", "/asyncio/"),
)
FUNCTIONS = (
    ("decide", "decide"),
    ("RunState.model_copy", "model_copy"),
    ("RecordCodec.encode", "encode"),
    ("RecordCodec.decode_as", "decode_as"),
    ("AIOKafkaProducer.send", "send"),
    ("execute (agent call)", "execute"),
    ("Fetcher (aiokafka consumer)", "_fetch_requests_routine"),
    ("Sender (aiokafka producer)", "_sender_routine"),
)
IDLE = ("/selectors.py",)


def _package(path: str) -> str:
    for name, marker in PACKAGES:
        if marker in path:
            return name
    return "other"


def summarise(root: Any) -> dict[str, Any]:
    """Self time by package and inclusive time of key functions, in seconds and as shares of busy time."""
    by_pkg: dict[str, float] = {}
    by_fn: dict[str, float] = {}
    idle = 0.0

    def walk(frame: Any, open_fns: frozenset[str], parent_path: str = "") -> None:
        nonlocal idle
        path = frame.file_path or ""
        if frame.is_synthetic or not path or path.startswith("<"):
            path = parent_path  # [self] time and built-ins count for their caller
        self_time = frame.time - sum(c.time for c in frame.children)
        if any(m in path for m in IDLE):
            idle += frame.time
            return
        by_pkg[_package(path)] = by_pkg.get(_package(path), 0.0) + self_time
        opened = open_fns
        for label, fn in FUNCTIONS:
            if frame.function == fn and label not in open_fns:
                owner = label.split(".")[0].split(" ")[0]
                if "." in label and owner not in (frame.class_name or "") and owner != "RecordCodec":
                    continue
                by_fn[label] = by_fn.get(label, 0.0) + frame.time
                opened = opened | {label}
        for c in frame.children:
            walk(c, opened, path)

    walk(root, frozenset())
    busy = sum(by_pkg.values()) or 1.0
    return {
        "busy_s": busy,
        "idle_s": idle,
        "self_by_package": {
            k: {"s": v, "share": v / busy} for k, v in sorted(by_pkg.items(), key=lambda x: -x[1])
        },
        "inclusive_by_function": {
            k: {"s": v, "share": v / busy} for k, v in sorted(by_fn.items(), key=lambda x: -x[1])
        },
    }
