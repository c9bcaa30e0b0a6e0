"""The worker process's event loop: uvloop by default where installed, asyncio's on request."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from calmrun import eventloop
from calmrun.errors import ConfigError
from calmrun.settings import load_settings


async def _which() -> str:
    await asyncio.sleep(0)
    return eventloop.loop_name(asyncio.get_running_loop())


def test_auto_and_uvloop_run_on_uvloop_and_asyncio_on_the_standard_loop() -> None:
    assert eventloop.run(_which(), "auto") == "uvloop"
    assert eventloop.run(_which(), "uvloop") == "uvloop"
    assert eventloop.run(_which(), "asyncio") == "asyncio"
    assert eventloop.loop_factory("auto") is uvloop.new_event_loop


def test_without_uvloop_auto_falls_back_and_uvloop_says_what_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an installation without it looks like
    assert eventloop.run(_which(), "auto") == "asyncio"
    with pytest.raises(ConfigError, match="pip install uvloop"):
        eventloop.loop_factory("uvloop")


def test_the_setting_defaults_to_auto_and_takes_each_choice() -> None:
    assert load_settings().worker.event_loop == "auto"
    assert load_settings(worker={"event_loop": "asyncio"}).worker.event_loop == "asyncio"
    with pytest.raises(ConfigError, match="event_loop"):
        load_settings(worker={"event_loop": "trio"})
