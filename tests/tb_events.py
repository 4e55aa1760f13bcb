"""Reading TensorBoard event files back without TensorFlow (the tests' view of what TB shows)."""

import glob
import os
import struct
from typing import Any


def read_events(logdir: str) -> list[Any]:
  """All Event protos of the TensorBoard event files in `logdir`, oldest file first (no TF)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      # TFRecord framing: uint64 length, uint32 masked crc of length, payload, uint32 crc.
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def read_event_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """Scalars of the event files in `logdir` as {tag: {step: value}} (later events win)."""
  scalars: dict[str, dict[int, float]] = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      if value.HasField("simple_value"):
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars
