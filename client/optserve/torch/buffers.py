"""Host arrays for a torch tensor: numpy views of it where it lives on the CPU, pinned copies where not.

A pull writes the parameters into numpy arrays (`Model.pull(out=...)`) and a push reads numpy
arrays, so each parameter and gradient needs one. A contiguous CPU tensor of a dtype numpy has (or
bfloat16, whose bits ml_dtypes reinterprets) *is* its own host array: the view writes through, so
the pull lands in the tensor itself with no copy. Anything else (a CUDA tensor, a non-contiguous one)
gets a staging tensor on the host, pinned when CUDA is there so that the copies between it and the
device run as DMA, and is copied to or from it.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch


def numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """The tensor's memory as a writable numpy array, or None when it cannot be viewed (not on the
    CPU, not contiguous, or a dtype numpy lacks)."""
    if not t.requires_grad and t.is_contiguous():  # a gradient: the common case, one call
        try:
            return t.numpy()
        except (TypeError, RuntimeError):  # on a device, or bfloat16: the general path below
            pass
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        return t.numpy()
    except TypeError:  # a dtype numpy has no equivalent of
        return None


class HostMirror:
    """The host array of one tensor: `array` is what pulls write and pushes read.

    For a tensor that `numpy_view` can view, `array` is that view and the copies do nothing.
    Otherwise `array` is the view of a host staging tensor (pinned when CUDA is available), and
    `to_device` / `from_device` copy between it and the tensor."""

    def __init__(self, like: torch.Tensor):
        self.shape, self.dtype = tuple(like.shape), like.dtype
        view = numpy_view(like)
        if view is not None:
            self.stage: torch.Tensor | None = None
            self.array = view
            self.ptr = like.data_ptr()
        else:
            pin = like.device.type == "cuda" and torch.cuda.is_available()
            self.stage = torch.empty(self.shape, dtype=like.dtype, pin_memory=pin)
            staged = numpy_view(self.stage)
            if staged is None:
                raise TypeError(f"a tensor of dtype {like.dtype} cannot be sent to an optserve server")
            self.array = staged
            self.ptr = -1

    def views(self, t: torch.Tensor) -> bool:
        """Whether `array` is `t`'s own memory (a pull into it needs no copy back)."""
        return t.data_ptr() == self.ptr

    def fits(self, t: torch.Tensor) -> bool:
        """Whether this mirror still serves `t` (False once `t.data` was replaced by other memory,
        another device or dtype: then make a new one)."""
        if self.stage is None:
            return self.views(t)
        return numpy_view(t) is None and tuple(t.shape) == self.shape and t.dtype == self.dtype

    def from_device(self, t: torch.Tensor) -> np.ndarray:
        """`t`'s values in a host array: its own view when it has one, else the staging copy
        (non-blocking: `synchronize` before reading it)."""
        view = numpy_view(t)
        if view is not None:
            return view
        if self.stage is None:
            self.stage = torch.empty(self.shape, dtype=self.dtype, pin_memory=t.device.type == "cuda")
            staged = numpy_view(self.stage)
            assert staged is not None
            self.array = staged
        self.stage.copy_(t.detach(), non_blocking=t.device.type == "cuda")
        return self.array

    def to_device(self, t: torch.Tensor) -> None:
        """Writes `array` (just pulled) into `t`, in place; nothing when `array` is `t`'s memory."""
        if self.views(t):
            return
        assert self.stage is not None
        with torch.no_grad():
            t.copy_(self.stage, non_blocking=t.device.type == "cuda")


def synchronize(tensors: Any) -> None:
    """Waits for the non-blocking device-to-host copies of `tensors`' devices."""
    if any(t.device.type == "cuda" for t in tensors):
        torch.cuda.synchronize()
