"""Pinning without a broker: the identity of a definition, the registry, the decider's migration, replay
that picks the definition per event, the assignor's placement, and old state records still decoding."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from calmrun.errors import ConfigError
from calmrun.replay.recorded import replay_recorded, resolver
from calmrun.replay.snapshot import Snapshot
from calmrun.streams.versions import (
    VersionAssignor,
    member_data,
    place,
    read_member_data,
    says_resumes,
)
from calmrun.wire.avro import MARKER, schema_fingerprint
from calmrun.wire.codec import RecordCodec, _without, wire_models
from calmrun.workflow.decider import decide
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import DeciderInput, MigrateRequested, RunRequested, StepResult
from calmrun.workflow.history import inputs_from_events
from calmrun.workflow.registry import Definitions, Pin, pin_of, version_order
from calmrun.workflow.state import RunState
from tests.versions.support import V1, V2, V3, pinned, write_yaml
from tests.workflow.test_decider_properties import histories


def test_the_digest_is_the_content_and_spelled_out_defaults_change_nothing(tmp_path) -> None:
    from calmrun.workflow.definition import load_workflow

    again = load_workflow(write_yaml(V1, tmp_path / "v1.yaml"))  # defaults left out of the YAML
    assert again.digest == V1.digest and len(V1.digest) == 12
    assert V1.digest != V3.digest != V2.digest
    assert pinned("1", last_agent="add_ten").digest != V1.digest  # same version, other content


def test_newest_is_the_highest_version_numerically_then_as_text() -> None:
    assert sorted(["10", "9", "2", "beta", "alpha"], key=version_order) == ["2", "9", "10", "alpha", "beta"]
    defs = Definitions([V3, V1, V2])
    assert defs.newest("pin") is V3 and list(defs) == ["pin"] and len(defs.values()) == 3
    assert defs.pinned("pin", "1", V1.digest) is V1
    assert defs.pinned("pin", "1", "0" * 12) is None  # same version, other content: not this one
    assert defs.pinned("pin", "1", "") is V1  # a state from before digests: its version will do


def test_one_name_and_version_with_two_contents_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"version '1' is given twice with different content"):
        Definitions([V1, pinned("1", last_agent="add_ten")])
    Definitions([V1, V1])  # the same definition twice is fine


def _run(wf=V1) -> RunState:
    d = decide(wf, None, RunRequested("r1", "pin", {"n": 0}, at_ms=1000))
    assert d.state is not None
    d = decide(wf, d.state, StepResult("r1", "a", 1, at_ms=1100, output={"n": 1}))
    assert d.state is not None and "b" in d.state.steps
    return d.state


def test_a_migration_is_a_decision_that_repins_the_run() -> None:
    state = _run()
    d = decide(V3, state, MigrateRequested("r1", 1200, "3", V3.digest, by="ops", checked_seq=state.seq))
    assert d.ignored is None and d.state is not None
    assert [e.type for e in d.events] == ["run.migrated"]
    assert d.events[0].data["from"] == {"version": "1", "digest": V1.digest}
    assert (d.state.version, d.state.digest) == ("3", V3.digest)
    again = decide(V3, d.state, MigrateRequested("r1", 1300, "3", V3.digest, checked_seq=d.state.seq))
    assert again.ignored is not None and "already" in again.ignored  # delivered twice: one migration
    moved_on = decide(V3, state, MigrateRequested("r1", 1200, "3", V3.digest, checked_seq=state.seq - 1))
    assert moved_on.ignored is not None and "moved on" in moved_on.ignored
    # a target without a step the run has is refused, whatever the operator sent
    renamed = decide(V2, state, MigrateRequested("r1", 1200, "2", V2.digest))
    assert renamed.ignored is not None and "no steps ['b']" in renamed.ignored


def test_replay_decides_each_input_with_the_definition_in_force() -> None:
    state = _run()
    events = []
    s: RunState | None = None
    inputs = [
        RunRequested("r1", "pin", {"n": 0}, at_ms=1000),
        StepResult("r1", "a", 1, at_ms=1100, output={"n": 1}),
        MigrateRequested("r1", 1200, "3", V3.digest, checked_seq=state.seq),
        StepResult("r1", "b", 1, at_ms=1300, output={"n": 2}),
        StepResult("r1", "c", 1, at_ms=1400, output={"n": 12}),
    ]
    wf = V1
    for inp in inputs:
        if isinstance(inp, MigrateRequested):
            wf = V3
        d = decide(wf, s, inp)
        s = d.state
        events.extend(d.events)
    assert s is not None and s.status == "completed" and s.version == "3"
    snap = Snapshot(run_id="r1", state=s, events=events)
    assert replay_recorded(V1, snap, resolver([V1, V3], "pin")).verdict == "converged"
    # a v4 like v3 would have decided it all the same (the recorded migration included)
    assert replay_recorded(pinned("4", last_agent="add_ten"), snap).verdict == "converged"
    diverged = replay_recorded(V2, snap)
    assert diverged.verdict == "diverged" and diverged.divergence is not None
    assert diverged.divergence.seq == 4  # a's routing: recorded b, v2 goes to b2


def test_the_assignor_moves_a_partition_to_a_member_serving_what_it_needs() -> None:
    v1, v2 = pin_of(V1), pin_of(V2)
    serves = {"m-a": [v2], "m-b": [v1]}
    # by range: m-a has 0, 1; m-b has 2, 3
    assert place(4, serves, {}) == {0: "m-a", 1: "m-a", 2: "m-b", 3: "m-b"}
    needs = {"m-a": {0: {v1}, 1: {v2}}}
    # 0 moves to m-b, which gives back 2 (no run there needs anything): the shares stay even
    assert place(4, serves, needs) == {0: "m-b", 1: "m-a", 2: "m-a", 3: "m-b"}
    # nobody serves it: by range, as before (no guessing, no moving around)
    assert place(4, {"m-a": [v2], "m-b": [v2]}, needs) == {0: "m-a", 1: "m-a", 2: "m-b", 3: "m-b"}
    # a partition needing both versions, served one each: it stays with its current owner
    both = {"m-b": {2: {v1, v2}}}
    assert place(4, serves, both)[2] == "m-b"
    # an old state's need (no digest) is served by that version with any digest
    assert place(4, serves, {"m-a": {0: {Pin("pin", "1")}}})[0] == "m-b"
    # what a member publishes is what the leader reads
    data = member_data([v1, v2], {3: {v1}})
    assert read_member_data(data) == ([v1, v2], {3: {v1}}) and read_member_data(b"junk") == ([], {})


def test_states_written_before_pinning_still_decode() -> None:
    codec = RecordCodec(wire_models())
    # today's schema without what was added since: here, and by 0.4 (a child's parent, a step's loop
    # iteration and map progress)
    since = {
        "RunState": {"digest", "held", "signals", "parent", "history"},
        "StepState": {"iteration", "map", "tool_approval"},  # and a tool call waiting for a person
    }
    schema = _without(codec.schemas()["RunState"], since)
    assert schema_fingerprint(schema).hex() == "f7ee01406604c161"  # what calmrun wrote until this change
    old = _run().model_dump(mode="python", exclude={"digest", "held", "signals"})
    buf = io.BytesIO()
    buf.write(MARKER + schema_fingerprint(schema))
    to_avro = codec._derived["RunState"].to_avro
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), to_avro(old) if to_avro else old)
    back = codec.decode_as(buf.getvalue(), RunState)
    assert (back.version, back.digest, back.held, back.steps["b"].status) == ("1", "", [], "scheduled")
    assert back.history == 1  # it goes on recording a run.routed after every step, as it began


def _fold(wfs: dict[str, WorkflowDef], start: WorkflowDef, inputs: list[DeciderInput]) -> tuple[Any, list]:
    wf, state, events = start, None, []
    for inp in inputs:
        if isinstance(inp, MigrateRequested):
            wf = wfs[inp.version]
        d = decide(wf, state, inp)
        if d.ignored is None:
            state = d.state
            events.extend(d.events)
    return state, events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.data())
def test_a_migration_anywhere_in_a_history_changes_only_the_pin_and_replays(history, data) -> None:
    """A run moved (twice delivered) to a version with the same steps decides as it would have; its
    recorded history replays exactly, each input with the definition in force."""
    wf, inputs = history
    twin = parse_workflow({**wf.model_dump(mode="json"), "version": "2"})
    k = data.draw(st.integers(1, len(inputs)))
    move = MigrateRequested(inputs[0].run_id, inputs[k - 1].at_ms, "2", twin.digest)
    moved = [*inputs[:k], move, move, *inputs[k:]]
    plain_state, plain = _fold({}, wf, inputs)
    state, events = _fold({"2": twin}, wf, moved)
    migrated = [e for e in events if e.type == "run.migrated"]
    if plain_state is not None and not _running_after(wf, inputs[:k]):
        event("the run was over before the migration")
        assert not migrated  # a finished run is not moved
        return
    event("migrated")
    assert len(migrated) == 1 and (state.version, state.digest) == ("2", twin.digest)

    def shape(evs: list) -> list:
        return [(e.type, e.step, e.attempt, e.data) for e in evs if e.type != "run.migrated"]

    assert shape(events) == shape(plain)
    snap = Snapshot(run_id=state.run_id, state=state, events=events)
    assert replay_recorded(wf, snap, resolver([wf, twin], wf.name)).verdict == "converged"
    assert inputs_from_events(events).count(move) == 1


def _running_after(wf: WorkflowDef, inputs: list[DeciderInput]) -> bool:
    state, _ = _fold({}, wf, inputs)
    return state is not None and state.status == "running"


def test_the_group_resumes_only_when_every_member_says_so() -> None:
    """``worker.task_records: auto``: the leader tells every member whether each one resumes attempts from
    restored states; an older worker's metadata (no ``resumes``) or a member that writes records keeps the
    group writing task records."""
    v1 = Pin("pin", "1", "d1")
    new, also_new = member_data([v1], {}, resumes=True), member_data([v1], {0: {v1}}, resumes=True)
    old = b'{"needs": {}, "serves": ["pin@1#d1"]}'  # what a worker before this change publishes
    assert says_resumes(new) and not says_resumes(old) and not says_resumes(b"junk")
    assert read_member_data(new) == ([v1], {})  # the versions read as before
    assignor = VersionAssignor.for_worker([v1], resumes=True)
    cluster = ClusterMetadata()

    def told(*datas: bytes) -> list[bool]:
        members = {f"m{i}": ConsumerProtocolMemberMetadata(0, ["t"], d) for i, d in enumerate(datas)}
        return [says_resumes(a.user_data) for a in assignor.assign(cluster, members).values()]

    assert told(new, also_new) == [True, True]
    assert told(new, old) == [False, False]
    assert told(new, member_data([v1], {})) == [False, False]  # a member with task_records: true
    # each member's class keeps what the last assignment said; an older leader's assignment says nothing
    other = VersionAssignor.for_worker([v1], resumes=True)
    members = {"m0": ConsumerProtocolMemberMetadata(0, ["t"], new)}
    assignor.on_assignment(assignor.assign(cluster, members)["m0"])
    assert assignor.group_resumes and not other.group_resumes
    assert not says_resumes(b"") and not says_resumes(b"junk")
