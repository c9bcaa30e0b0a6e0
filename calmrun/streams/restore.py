"""The restore of partitions taken over: their runs from the state topic, inputs at the committed offsets.

A partition's runs are rebuilt from the compacted state topic up to its end offset (read ``read_committed``:
the last owner's open transaction, aborted by our writer's initialisation, is never read). A state record not
written by a worker is parked and the rest restored. Its inputs are then positioned at the committed offsets
as of now (the last owner's are settled by the fence), and the checkpoint is told where they start.
"""

from __future__ import annotations

from aiokafka.structs import TopicPartition

from calmrun.errors import DecodeError
from calmrun.kafka.reader import read_to_end
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.ports import Parking
from calmrun.streams.runtable import RunTable
from calmrun.streams.shared import Shared
from calmrun.workflow.state import RunState


class Restore:
    """Rebuilds run tables and positions inputs for partitions taken over; see the module docstring.

    Args:
        parking: parks an undecodable state record (it finishes no input).
    """

    def __init__(self, shared: Shared, checkpoint: Checkpoint, parking: Parking) -> None:
        self.topics, self.codec, self._own = shared.topics, shared.codec, shared.ownership
        self._checkpoint, self._parking = checkpoint, parking

    async def runs(self, parts: set[int]) -> None:
        """Rebuild the run table of ``parts`` from the compacted state topic, up to its end offset."""
        own = self._own
        assert own.restorer is not None
        tps = [TopicPartition(self.topics.state, p) for p in parts]
        for p in parts:
            own.runs[p] = RunTable(self.codec)
        async for rec in read_to_end(own.restorer, tps):
            table = own.runs[rec.partition]
            run_id = (rec.key or b"").decode(errors="replace")
            if rec.value is None:
                table.pop(run_id)
                continue
            try:
                table.put(run_id, self.codec.decode_as(rec.value, RunState), rec.value)
            except DecodeError as exc:  # not written by a worker: park it, restore the rest
                self._parking.park(rec, exc, None, None)
        own.restorer.unsubscribe()
        for p in parts:
            own.counts.restored_runs += len(own.runs[p])
            own.counts.restored_partitions += 1

    async def seek_committed(self, p: int) -> None:
        """Position ``p``'s inputs at the committed offsets as of now (the last owner's are settled), and
        tell the checkpoint (a probe transaction commits them again)."""
        consumer = self._own.consumer
        assert consumer is not None
        found: dict[TopicPartition, int] = {}
        for tp in self._own.input_tps(p):
            committed = await consumer.committed(tp)
            if committed is not None:
                consumer.seek(tp, committed)
            else:
                await consumer.seek_to_beginning(tp)
            found[tp] = committed or 0  # 0: nothing committed, the beginning skips nothing
        self._checkpoint.positioned(found)
