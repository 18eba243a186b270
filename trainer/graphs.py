"""CUDA-graph replays of the trainer's no-grad denoiser calls.

At batch 1 a UNet call with LoRA layers is launch-bound: Python and the kernel launches of ~15,000 small ops
take longer than the kernels (SDXL at 1024 px on an H200: 174 ms eager against 50 ms for the same call
replayed as a CUDA graph). A no-grad call with fixed shapes is the textbook case for a graph (PyTorch's
"CUDA Graphs" notes; diffusers' and TensorRT's fast samplers): captured once per call signature, then
replayed with its inputs copied into static buffers. The replay runs the captured kernels on the current
weights (optimizer steps change them in place), so it computes what the eager call computes.

Where graphs are used (see `uses_cuda_graphs`): CUDA, the `cuda_graphs` setting on, and a model adapter that
says its calls can be captured (diffusers; ComfyUI's model calls consult its memory manager and patches, so
they run eagerly). A call signature is captured on its second use (the first, eager, call fills the caches a
call builds once: schedule tables, SDXL size ids); a capture that fails falls back to eager calls for that
signature, with a warning, and training goes on.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from .denoiser import Conditioning

logger = logging.getLogger(__name__)

Call = Callable[[Tensor, Tensor, Conditioning], Tensor]


def uses_cuda_graphs(config, adapter, device_type: str) -> bool:
    """Whether a run of `config` on `adapter` replays its no-grad calls as CUDA graphs."""
    return bool(config.cuda_graphs) and device_type == "cuda" and adapter.supports_cuda_graphs


def _signature(name: str, x: Tensor, level: Tensor, cond: Conditioning) -> tuple:
    tensors = [("x", x), ("level", level)] + sorted(cond.tensors.items())
    device = x.device.type
    autocast = torch.is_autocast_enabled(device) if device in ("cuda", "cpu") else False
    return (name, autocast, torch.get_autocast_dtype(device) if autocast else None,
            tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in tensors))


class _CudaGraph:
    """One captured call: static inputs, the graph, its static output."""

    def __init__(self, fn: Call, x: Tensor, level: Tensor, cond: Conditioning, pool):
        self.x, self.level = x.clone(), level.clone()
        self.cond = Conditioning({k: v.clone() for k, v in cond.tensors.items()})
        self.graph, self.output = self._capture(fn, pool)

    def _capture(self, fn: Call, pool) -> tuple[object, Tensor]:
        self._warm_up(fn)
        # Autocast caches the low-precision copy of each trainable weight while a context is open (accelerate's
        # forward wrapper opens one with caching on). A cast cached by the warm-up would be read by the graph
        # after the cache lets it go (an illegal access at a later replay) and would go stale when the optimizer
        # steps: the capture must record the casts itself.
        torch.clear_autocast_cache()
        return self._record(fn, pool)

    def _warm_up(self, fn: Call) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the warm-up PyTorch's notes ask for before a capture
            fn(self.x, self.level, self.cond)
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, fn: Call, pool) -> tuple[object, Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = fn(self.x, self.level, self.cond)
        return graph, output

    def replay(self, x: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        self.x.copy_(x)
        self.level.copy_(level)
        for name, value in cond.tensors.items():
            self.cond[name].copy_(value)
        self.graph.replay()
        return self.output.clone()  # the static output is rewritten by the next replay of any graph in the pool


class GraphedCalls:
    """Replays no-grad calls `fn(x, level, cond)` as CUDA graphs, one per call signature (name, shapes, dtypes,
    autocast state). Every graph draws its temporaries from one shared pool: calls run one after another and
    each result is copied out at once, so the graphs can share their memory (the pool is about the widest
    call's temporaries, which the memory plan counts). `backend` builds a captured call (tests pass a stand-in
    that records instead of capturing)."""

    def __init__(self, max_graphs: int = 64, backend=_CudaGraph):
        self.max_graphs, self.backend = max_graphs, backend
        self.graphs: dict[tuple, object] = {}
        self.failed: dict[tuple, str] = {}
        self._seen: set[tuple] = set()
        self._pool = None

    def __call__(self, name: str, fn: Call, x: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        if torch.is_grad_enabled():
            return fn(x, level, cond)  # a graph holds no autograd history
        key = _signature(name, x, level, cond)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph.replay(x, level, cond)
        if key not in self._seen or key in self.failed or len(self.graphs) >= self.max_graphs:
            self._seen.add(key)
            return fn(x, level, cond)
        try:
            graph = self._capture(fn, x, level, cond)
        except Exception as error:  # e.g. an op that syncs with the host: this call stays eager
            self.failed[key] = f"{type(error).__name__}: {error}"
            logger.warning("cuda_graphs: the %s call %s cannot be captured (%s); it runs eagerly", name,
                           [tuple(x.shape)], self.failed[key][:300])
            return fn(x, level, cond)
        self.graphs[key] = graph
        return graph.replay(x, level, cond)

    def _capture(self, fn: Call, x: Tensor, level: Tensor, cond: Conditioning):
        if self._pool is None and self.backend is _CudaGraph:
            self._pool = torch.cuda.graph_pool_handle()
        torch.clear_autocast_cache()  # nothing cached before the capture, nothing of the pool's left after it
        try:
            return self.backend(fn, x, level, cond, self._pool)
        finally:
            torch.clear_autocast_cache()

    def reset(self) -> None:
        """Drop every graph (and so the pool's memory): after the model's structure or devices change."""
        self.graphs.clear()
        self.failed.clear()
        self._seen.clear()
        self._pool = None
