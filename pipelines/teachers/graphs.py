"""The GPU work of one teacher batch, replayed from CUDA graphs.

The teachers loop on an H100 is bound by kernel launches, not by the device: a DINOv2 or DA3 batch
is a few hundred small kernels, and the thread that launches them shares the GIL with the store's
I/O threads, so the device sat idle 58-63% of a profiled run (bench/RESULTS.md, issue 19 "Round 4").
A CUDA graph launches the whole batch (preprocessing, forwards, float16 casts, the store codec's
encoding) at once. Measured in longer runs (4,096 clips, H200, bench/RESULTS.md issue 19 "Round 5")
the loop turned out GPU-bound in steady state and disk-bound for DA3, so graphs gained little
(DINOv2 +3%) or lost (DA3 -6%: faster batches only wait longer for free shard buffers); they are
an option (``TeachersConfig.cuda_graphs``), off by default.

How it is used (``flows.teachers_engine.ShardLoop``): the first batch of a shape runs eagerly
(which also lets cuBLAS/cuDNN pick their algorithms), the second is captured and replayed, and every
later one is replayed. Replays write into the graph's own output tensors, so each shape has
``copies`` graphs used in turn, and a graph is replayed again only after the device-to-host copy of
its last outputs is done (:meth:`GraphedBatches.release_after`): the copy of batch i overlaps the
forward of batch i + 1. At most ``max_shapes`` shapes are captured (a run has its full batch and
perhaps a shorter last one); any other shape runs eagerly. A replay launches the same kernels as the
eager call, so the stored bytes are the same (the teachers benchmark compares them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

EncodeBatch = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""(frames_BTHWC, observed_BHWC) on the device -> stored part name -> encoded device tensor."""


@dataclass
class GraphSlot:
    """One captured graph: its input buffers, its outputs, and the event after which the outputs
    of its last replay have been copied out (None: nothing pending)."""

    graph: torch.cuda.CUDAGraph
    frames_BTHWC: torch.Tensor
    observed_BHWC: torch.Tensor
    outputs: dict[str, torch.Tensor]
    released: torch.cuda.Event | None = None


@dataclass
class _Shape:
    seen: int = 0
    slots: list[GraphSlot] = field(default_factory=list)
    turn: int = 0


class GraphedBatches:
    """``encode`` of batches on a CUDA device, replayed from CUDA graphs per input shape."""

    def __init__(self, encode: EncodeBatch, copies: int = 2, max_shapes: int = 2):
        if copies < 1 or max_shapes < 0:
            raise ValueError(f"CUDA graphs: copies {copies} must be >= 1 and max_shapes {max_shapes} >= 0")
        self.encode, self.copies, self.max_shapes = encode, copies, max_shapes
        self._shapes: dict[tuple, _Shape] = {}
        self.failed: str | None = None  # why capturing was given up (then everything runs eagerly)
        self.replays = 0

    @torch.inference_mode()
    def __call__(self, frames_BTHWC: torch.Tensor,
                 observed_BHWC: torch.Tensor) -> tuple[dict[str, torch.Tensor], GraphSlot | None]:
        """The encoded parts of one batch, and the slot whose outputs they are (None: computed
        eagerly, fresh tensors). A slot's outputs stay valid until its :meth:`release_after` event
        has passed and it is replayed again."""
        key = (tuple(frames_BTHWC.shape), tuple(observed_BHWC.shape), frames_BTHWC.dtype, frames_BTHWC.device)
        shape = self._shapes.setdefault(key, _Shape())
        shape.seen += 1
        if shape.seen == 1 or self.failed is not None or not self._may_capture(shape):
            return self.encode(frames_BTHWC, observed_BHWC), None
        if len(shape.slots) < self.copies:
            slot = self._capture(frames_BTHWC, observed_BHWC, shape)
            if slot is None:
                return self.encode(frames_BTHWC, observed_BHWC), None
        else:
            slot = shape.slots[shape.turn % self.copies]
        shape.turn += 1
        stream = torch.cuda.current_stream(frames_BTHWC.device)
        if slot.released is not None:
            stream.wait_event(slot.released)
        slot.frames_BTHWC.copy_(frames_BTHWC)
        slot.observed_BHWC.copy_(observed_BHWC)
        slot.graph.replay()
        self.replays += 1
        return slot.outputs, slot

    def release_after(self, slot: GraphSlot | None, event: torch.cuda.Event | None) -> None:
        """The outputs of ``slot``'s last replay are free once ``event`` (their copy out) has passed."""
        if slot is not None:
            slot.released = event

    def _may_capture(self, shape: _Shape) -> bool:
        captured = sum(1 for s in self._shapes.values() if s.slots)
        return bool(shape.slots) or captured < self.max_shapes

    def _capture(self, frames_BTHWC: torch.Tensor, observed_BHWC: torch.Tensor, shape: _Shape) -> GraphSlot | None:
        """Capture one more graph of this shape (each in its own memory pool: the replays of two
        graphs never share buffers); on failure warn once, remember why and return None (the run goes
        on eagerly)."""
        device = frames_BTHWC.device
        frames, observed = frames_BTHWC.clone(), observed_BHWC.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                self.encode(frames, observed)  # once more outside the capture, on the capturing stream
            torch.cuda.current_stream(device).wait_stream(side)
            # thread_local: the store's reader threads pin host memory and upload while this thread
            # captures; the default ("global") would make their CUDA calls fail during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.encode(frames, observed)
        except RuntimeError as err:
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"teacher batches run without CUDA graphs: capturing failed ({self.failed})", stacklevel=3)
            torch.cuda.synchronize(device)
            return None
        slot = GraphSlot(graph, frames, observed, outputs)
        shape.slots.append(slot)
        return slot
