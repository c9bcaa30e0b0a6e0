"""Encode and decode cost of one ``RunEvent``: Avro single-object vs Confluent framing (IDs cached).

``PYTHONPATH=. .venv/bin/python bench/wire_framing.py``: in-process, no broker; the registry is the
tests' stub (``tests/wire/registry_stub.py``), asked once before timing starts. Not part of
``python -m bench``.
"""

from __future__ import annotations

import timeit

from calmrun.settings import Settings
from calmrun.wire.codec import wire_codec
from calmrun.workflow.events import RunEvent
from tests.wire.registry_stub import RegistryStub, serving

N = 20_000


def main() -> None:
    ev = RunEvent(
        run_id="r-1",
        seq=3,
        type="step.succeeded",
        at_ms=5,
        workflow="lin",
        step="s1",
        attempt=1,
        data={"output": {"n": 2, "label": "s1:1"}},
    )
    with serving(RegistryStub()) as url:
        single = wire_codec()
        confluent = wire_codec(Settings(wire={"format": "confluent", "registry": {"url": url}}).wire)
        confluent.decode(confluent.encode(ev, "p.runs.events"))  # the one registry call
        for name, codec in (("single-object", single), ("confluent", confluent)):
            data = codec.encode(ev, "p.runs.events")
            enc = min(timeit.repeat(lambda c=codec: c.encode(ev, "p.runs.events"), number=N, repeat=3)) / N
            dec = min(timeit.repeat(lambda c=codec, d=data: c.decode(d), number=N, repeat=3)) / N
            cost = f"encode {enc * 1e6:.1f} us, decode {dec * 1e6:.1f} us (best of 3 x {N})"
            print(f"{name}: {len(data)} bytes, {cost}")


if __name__ == "__main__":
    main()
