"""The one cache of weights derived from others: summed biases, stacked weights, Winograd transforms, and any
packed weight to come.

``derived(owner, name, fn, *sources)`` is ``fn(*sources)``, made once per (owner, name, sources) and remade when
a source changes: an entry is keyed by each source's identity and checked against its storage and version
counter (an optimizer step, ``load_state_dict`` or ``.data`` replaced by ``.to()`` moves one of them). An entry
keeps its sources' storage alive, so an address is never reused under it, but not the source tensors: it goes
with the first of them to be freed. ``forget(*tensors)`` drops the entries of tensors about to be replaced (a
module cast or moved), so no stale copy outlives them. Sources made under torch.inference_mode have no version
counter to key by: their derived value is made on every call. During CUDA-graph capture a stale entry is
recomputed inside the graph and not stored.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["capturing", "derived", "forget", "holds"]

# (id(owner), name, id(source), ...) -> (weak refs to the sources, their (storage, version, dtype, shape),
# detached aliases holding their storage, the value)
_entries: dict[tuple, tuple[tuple, tuple, tuple, torch.Tensor]] = {}


def capturing() -> bool:
    """Whether a CUDA graph is being captured (then nothing is stored or read back)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def derived(owner, name: str, fn, *sources: torch.Tensor) -> torch.Tensor:
    """``fn(*sources)`` from the cache (see the module docstring); ``owner`` (a module, or None) and ``name`` tell
    apart values derived from the same sources."""
    if any(s.is_inference() for s in sources):
        return fn(*sources)
    key = (id(owner), name, *(id(s) for s in sources))
    state = tuple((s.data_ptr(), s._version, s.dtype, s.shape) for s in sources)
    hit = _entries.get(key)
    alive = hit is not None and all(ref() is s for ref, s in zip(hit[0], sources, strict=True))
    if alive and hit[1] == state:
        return hit[3]
    with torch.inference_mode(False), torch.no_grad():  # a value made under inference_mode must serve autograd
        value = fn(*sources)
    if capturing():
        return value
    if not alive:  # new sources: the entry goes with the first of them to be freed
        for s in sources:
            weakref.finalize(s, _entries.pop, key, None)
    _entries[key] = (tuple(weakref.ref(s) for s in sources), state, tuple(s.detach() for s in sources), value)
    return value


def forget(*tensors: torch.Tensor) -> None:
    """Drop every entry derived from any of ``tensors``."""
    ids = {id(t) for t in tensors}
    for key in [k for k in _entries if ids.intersection(k[2:])]:
        entry = _entries.get(key)
        if entry is not None and any(ref() is t for ref in entry[0] for t in tensors if id(t) in ids):
            del _entries[key]


def holds(tensor: torch.Tensor) -> bool:
    """Whether an entry is derived from ``tensor``."""
    return any(ref() is tensor for key, entry in _entries.items() if id(tensor) in key[2:] for ref in entry[0])
