"""CausalGraph: the row-aligned token adjacency of a batch, bit-packed.

Row ``i`` is the position whose output predicts token ``i+1`` (SPEC §2); ``A[b, i, j]`` says that
row ``i`` of sample ``b`` should attend to key ``j``. Only ``j <= i`` can be an edge. Storage is one
``int32`` word per 32 columns: bit ``j % 32`` of word ``j // 32`` in row ``i``, shape
``(B, T, ceil(T/32))``, shared by every layer and head. ``row_counts`` (B, T) keeps ``c_i`` beside it.

Packed (padding-free) rows hold several samples one after another; ``segment_ids`` (B, T), non-decreasing
along a row, says which sample each position belongs to. Row ``i`` may then attend only to keys
``seg_start[i] <= j <= i`` (its own sample): :func:`segment_starts` turns the ids into that lower bound,
the form every backend takes.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

WORD = 32


def num_words(T: int) -> int:
    return (T + WORD - 1) // WORD


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """bool (..., T) -> int32 (..., ceil(T/32)), bit j%32 of word j//32."""
    T = dense.shape[-1]
    W = num_words(T)
    pad = W * WORD - T
    d = torch.nn.functional.pad(dense.to(torch.int64), (0, pad))  # no branch on T: one compiled graph for all T
    d = d.reshape(*dense.shape[:-1], W, WORD)
    shifts = torch.arange(WORD, device=dense.device, dtype=torch.int64)
    words = (d << shifts).sum(-1)  # 0 .. 2^32-1
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, T: int) -> torch.Tensor:
    """int32 (..., W) -> bool (..., T)."""
    shifts = torch.arange(WORD, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * WORD)[..., :T].bool()


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits per int32 word, summed over the last dim -> int32."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = (x * 0x01010101) & 0xFFFFFFFF
    return (x >> 24).sum(-1).to(torch.int32)


class CausalGraph:
    """Bit-packed row-aligned adjacency for a batch of ``B`` samples of length ``T``.

    Build with :meth:`from_dense` or :meth:`from_edges`; ``strict=False`` drops invalid entries
    (edges to the future or out of range) and counts them in ``.dropped`` instead of raising.
    """

    def __init__(self, packed: torch.Tensor, seq_len: int, *, row_counts: torch.Tensor | None = None,
                 dropped: int = 0, segment_ids: torch.Tensor | None = None):
        if packed.dim() != 3 or packed.dtype != torch.int32:
            raise ValueError(f"packed adjacency must be int32 (B, T, ceil(T/32)); got {packed.dtype} "
                             f"{tuple(packed.shape)}")
        if packed.shape[1] != seq_len or packed.shape[2] != num_words(seq_len):
            raise ValueError(f"packed shape {tuple(packed.shape)} does not fit T={seq_len} "
                             f"(expected (B, {seq_len}, {num_words(seq_len)}))")
        starts = None
        if segment_ids is not None:
            starts = segment_starts(segment_ids, packed.shape[0], seq_len, packed.device)  # validates
            _check_within_segments(packed, starts)
        self._set(packed, popcount(packed) if row_counts is None else row_counts, dropped, segment_ids, starts)

    def _set(self, packed, row_counts, dropped, segment_ids, seg_start) -> "CausalGraph":
        self.packed = packed
        self.row_counts = row_counts
        self.dropped = int(dropped)
        self.segment_ids = segment_ids
        self._seg_start = seg_start  # computed (and checked) once, read by every layer of every forward
        return self

    @classmethod
    def _checked(cls, packed, row_counts, dropped=0, segment_ids=None, seg_start=None) -> "CausalGraph":
        """A graph from parts that were validated already (a copy, a slice, another device): no checks, no
        host sync."""
        return cls.__new__(cls)._set(packed, row_counts, dropped, segment_ids, seg_start)

    def with_segments(self, segment_ids: torch.Tensor, seg_start: torch.Tensor) -> "CausalGraph":
        """This graph for a packed forward whose samples ``segment_ids`` (with starts ``seg_start``) describe. A
        packed graph must have the same segments; an unpacked one must have no edge across two samples. The checks
        stay on the device (:func:`require`): one host sync in eager mode, none under ``torch.compile``."""
        if self._seg_start is not None:
            require((self._seg_start == seg_start).all(), "the adjacency's segments (CausalGraph.pack) disagree with "
                    "the packed samples that position_ids / seq_idx / cu_seq_lens_q describe")
            return self
        require(~_crossing_edges(self.packed, seg_start).any(),
                "an adjacency edge crosses from one packed sample into an earlier one; build packed graphs from "
                "per-sample graphs with CausalGraph.pack")
        return CausalGraph._checked(self.packed, self.row_counts, self.dropped, segment_ids, seg_start)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, dense: torch.Tensor, *, strict: bool = True) -> "CausalGraph":
        """``dense``: bool (B, T, T) or (T, T), row-aligned. Entries with col > row are an error
        (``strict=False``: dropped and counted)."""
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"adjacency must be a torch.Tensor, got {type(dense).__name__}")
        if dense.dtype != torch.bool:
            raise TypeError(f"dense adjacency must be torch.bool, got {dense.dtype}; "
                            "convert with `adj.bool()` if it holds 0/1 values")
        if dense.dim() == 2:
            dense = dense.unsqueeze(0)
        if dense.dim() != 3 or dense.shape[1] != dense.shape[2]:
            raise ValueError(f"dense adjacency must have shape (B, T, T) or (T, T); got {tuple(dense.shape)}")
        T = dense.shape[1]
        future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=dense.device), diagonal=1)
        bad = dense & future
        dropped = 0
        if bad.any():
            if strict:
                b, i, j = (int(x) for x in bad.nonzero()[0])
                raise ValueError(f"sample {b}: edge (row={i}, col={j}) points to the future (col > row); "
                                 f"{int(bad.sum())} such entries in total. Rows are row-aligned (row i "
                                 "predicts token i+1) and may only attend to cols <= i; pass strict=False "
                                 "to drop them")
            dropped = int(bad.sum())
            dense = dense & ~future
        return cls(pack_bits(dense), T, dropped=dropped)

    @classmethod
    def from_edges(cls, edges: Sequence[Iterable[tuple[int, int]]], seq_len: int, *, strict: bool = True,
                   device: torch.device | str | None = None) -> "CausalGraph":
        """``edges``: one iterable of ``(row, col)`` per sample; ``seq_len``: T."""
        T = int(seq_len)
        if T < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        B = len(edges)
        dense = torch.zeros(B, T, T, dtype=torch.bool)
        dropped = 0
        for b, sample in enumerate(edges):
            sample = list(sample)
            fast = _edge_tensor(sample)
            if fast is not None:  # the common case, vectorised: a list of int pairs
                i, j = fast[:, 0], fast[:, 1]
                ok = (i >= 0) & (i < T) & (j >= 0) & (j <= i)
                if not bool(ok.all()):
                    if strict:
                        sample = [sample[int(ok.logical_not().nonzero()[0])]]  # the per-edge loop words the error
                    else:
                        dropped += int((~ok).sum())
                        dense[b, i[ok], j[ok]] = True
                        continue
                else:
                    dense[b, i, j] = True
                    continue
            rows, cols = [], []
            for e in sample:
                try:
                    i, j = (int(x) for x in e)
                except (TypeError, ValueError):
                    raise ValueError(f"sample {b}: edge {e!r} is not a (row, col) pair of ints") from None
                if not (0 <= i < T and 0 <= j < T) or j > i:
                    if strict:
                        why = (f"outside [0, {T})" if not (0 <= i < T and 0 <= j < T)
                               else "points to the future (col > row)")
                        raise ValueError(f"sample {b}: edge (row={i}, col={j}) {why}; pass strict=False "
                                         "to drop and count such edges")
                    dropped += 1
                    continue
                rows.append(i)
                cols.append(j)
            if rows:
                dense[b, rows, cols] = True
        g = cls(pack_bits(dense), T, dropped=dropped)
        return g.to(device) if device is not None else g

    @staticmethod
    def cat(graphs: Sequence["CausalGraph"], *, side: str = "right") -> "CausalGraph":
        """Concatenate along the batch; shorter graphs are padded to the longest (see :meth:`pad_to`)."""
        if not graphs:
            raise ValueError("CausalGraph.cat needs at least one graph")
        T = max(g.seq_len for g in graphs)
        if any(g.segment_ids is not None for g in graphs) and any(g.seq_len != T for g in graphs):
            raise ValueError("CausalGraph.cat cannot pad packed graphs; pack all samples with CausalGraph.pack(..., "
                             "seq_len=T) to one length first")
        gs = [g.pad_to(T, side=side) for g in graphs]
        seg = None
        if any(g.segment_ids is not None for g in gs):
            seg = torch.cat([g.segment_ids if g.segment_ids is not None
                             else torch.zeros(g.batch_size, T, dtype=torch.int32, device=g.device) for g in gs])
        return CausalGraph(torch.cat([g.packed for g in gs]), T,
                           row_counts=torch.cat([g.row_counts for g in gs]),
                           dropped=sum(g.dropped for g in gs), segment_ids=seg)

    @staticmethod
    def pack(rows: Sequence[Sequence["CausalGraph"]], *, seq_len: int | None = None) -> "CausalGraph":
        """Packed (padding-free) graph: ``rows[b]`` lists the single-sample graphs laid end to end in packed
        row ``b``. Each sample's edges are shifted by its offset; ``segment_ids`` numbers the samples of a row
        0, 1, ... (positions past the last sample, up to ``seq_len``, form one more edge-free segment, for a
        row padded to the batch length). Edges cannot cross samples by construction."""
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("CausalGraph.pack needs at least one sample graph per packed row")
        for r in rows:
            for g in r:
                if not isinstance(g, CausalGraph) or g.batch_size != 1:
                    raise ValueError("CausalGraph.pack takes single-sample CausalGraphs (B=1); index a batch "
                                     "graph with graph[i]")
                if g.segment_ids is not None:
                    raise ValueError("CausalGraph.pack takes unpacked sample graphs")
        lengths = [sum(g.seq_len for g in r) for r in rows]
        T = max(lengths) if seq_len is None else int(seq_len)
        if T < max(lengths):
            raise ValueError(f"seq_len={T} is shorter than the longest packed row ({max(lengths)} tokens)")
        device = rows[0][0].device
        dense = torch.zeros(len(rows), T, T, dtype=torch.bool, device=device)
        seg = torch.empty(len(rows), T, dtype=torch.int32, device=device)
        for b, r in enumerate(rows):
            o = 0
            for s_idx, g in enumerate(r):
                dense[b, o:o + g.seq_len, o:o + g.seq_len] = g.to(device).to_dense()[0]
                seg[b, o:o + g.seq_len] = s_idx
                o += g.seq_len
            seg[b, o:] = len(r)
        return CausalGraph(pack_bits(dense), T, dropped=sum(g.dropped for r in rows for g in r), segment_ids=seg)

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return self.packed.shape[0]

    @property
    def seq_len(self) -> int:
        return self.packed.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def num_edges(self) -> int:
        return int(self.row_counts.sum())

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, idx) -> "CausalGraph":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        if self.segment_ids is None:
            return CausalGraph._checked(self.packed[idx], self.row_counts[idx])
        return CausalGraph._checked(self.packed[idx], self.row_counts[idx], 0, self.segment_ids[idx],
                                    self._seg_start[idx])

    def __repr__(self) -> str:
        packed = ""
        if self.segment_ids is not None:  # a segment starts where seg_start[i] == i
            n_seg = int((self.segment_starts() == torch.arange(self.seq_len, device=self.device)).sum())
            packed = f", segments={n_seg}"
        return f"CausalGraph(B={self.batch_size}, T={self.seq_len}, edges={self.num_edges}{packed}, device={self.device})"

    def to_dense(self) -> torch.Tensor:
        return unpack_bits(self.packed, self.seq_len)

    def to(self, device) -> "CausalGraph":
        if self.packed.device == torch.device(device):
            return self
        seg = [None if t is None else t.to(device) for t in (self.segment_ids, self._seg_start)]
        return CausalGraph._checked(self.packed.to(device), self.row_counts.to(device), self.dropped, *seg)

    def pad_to(self, seq_len: int, *, side: str = "right") -> "CausalGraph":
        """Grow to ``seq_len`` with edge-free rows/cols. ``side="left"`` shifts every edge by the
        padding (for left-padded batches)."""
        if seq_len < self.seq_len:
            raise ValueError(f"cannot pad a T={self.seq_len} graph down to {seq_len}")
        if side not in ("right", "left"):
            raise ValueError(f"side must be 'right' or 'left', got {side!r}")
        if seq_len == self.seq_len:
            return self
        if self.segment_ids is not None:
            raise ValueError("cannot pad a packed graph; give CausalGraph.pack the batch length (seq_len=)")
        p = seq_len - self.seq_len
        dense = self.to_dense()
        pads = (0, p, 0, p) if side == "right" else (p, 0, p, 0)
        dense = torch.nn.functional.pad(dense, pads)
        return CausalGraph(pack_bits(dense), seq_len, dropped=self.dropped)

    def segment_starts(self) -> torch.Tensor | None:
        """int32 (B, T) first position of each row's segment, or None for an unpacked graph."""
        return self._seg_start

    def counts(self, key_padding_mask: torch.Tensor | None = None,
               seg_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, n)`` int32 (B, T): annotated allowed keys and all allowed keys per row (SPEC §2).

        Allowed = ``seg_start[i] <= j <= i`` and key ``j`` is real (``key_padding_mask`` True);
        ``seg_start`` defaults to the graph's own segments (0 for an unpacked graph)."""
        B, T = self.batch_size, self.seq_len
        if seg_start is None:
            seg_start = self.segment_starts()
        kpm = None if key_padding_mask is None else check_key_padding_mask(key_padding_mask, B, T, self.device)
        if kpm is None and seg_start is None:
            n = torch.arange(1, T + 1, device=self.device, dtype=torch.int32).expand(B, T)
            return self.row_counts, n.contiguous()
        words = self.packed
        if kpm is not None:
            words = words & pack_bits(kpm).unsqueeze(1)
        real = torch.ones(B, T, dtype=torch.int32, device=self.device) if kpm is None else kpm.to(torch.int32)
        n = torch.cumsum(real, dim=1, dtype=torch.int32)
        if seg_start is not None:
            words = words & _words_from(seg_start, words.shape[-1])
            before = torch.nn.functional.pad(n, (1, 0))  # before[:, s] = real keys at positions < s
            n = n - before.gather(1, seg_start.long())
        return popcount(words), n


def _words_from(start: torch.Tensor, n_words: int) -> torch.Tensor:
    """int32 (B, T, W) bit masks of the columns ``j >= start[b, i]``."""
    w = torch.arange(n_words, device=start.device, dtype=torch.int64)
    first = (start.long() // WORD).unsqueeze(-1)
    partial = (-1 << (start.long() % WORD)).unsqueeze(-1) & 0xFFFFFFFF  # bits >= start % 32 of the first word
    word = torch.where(w < first, 0, torch.where(w == first, partial, 0xFFFFFFFF))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _crossing_edges(packed: torch.Tensor, seg_start: torch.Tensor) -> torch.Tensor:
    """bool (B, T, W): the set bits of each row that lie before its segment's start."""
    return (packed & ~_words_from(seg_start, packed.shape[-1])) != 0


def _check_within_segments(packed: torch.Tensor, starts: torch.Tensor) -> None:
    if bool(_crossing_edges(packed, starts).any()):
        T = packed.shape[1]
        cross = unpack_bits(packed, T) & (torch.arange(T, device=packed.device) < starts[:, :, None])
        b, i, j = (int(t) for t in cross.nonzero()[0])
        raise ValueError(f"packed row {b}: adjacency edge (row={i}, col={j}) crosses from one packed sample "
                         f"into an earlier one (that sample starts at {int(starts[b, i])}); build packed "
                         "graphs from per-sample graphs with CausalGraph.pack")


def require(ok: torch.Tensor, message: str, detail=None) -> None:
    """Raise ``ValueError`` with ``message`` unless the bool scalar tensor ``ok`` is True.

    For the checks of a forward's inputs that need their values: in eager mode one host read (a clear error at
    once, completed by ``detail()`` where given); under ``torch.compile`` a device-side assertion
    (``torch._assert_async``), so the check neither breaks the graph nor waits for the device."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message + (detail() if detail is not None else ""))


def segment_starts(segment_ids: torch.Tensor, B: int, T: int, device) -> torch.Tensor:
    """int32 (B, T): for each position the index of the first position of its segment.

    ``segment_ids`` (B, T) integer, non-decreasing along each row (samples laid end to end, as transformers'
    ``DataCollatorWithFlattening`` makes them); equal ids = one sample."""
    _check_b_t(segment_ids, "segment_ids", "an integer tensor", B, T, device)
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    step = segment_ids[:, 1:] - segment_ids[:, :-1]
    if bool((step < 0).any()):
        b, i = (int(x) for x in (step < 0).nonzero()[0])
        raise ValueError(f"segment_ids decrease within row {b} (position {i + 1}: {int(segment_ids[b, i])} -> "
                         f"{int(segment_ids[b, i + 1])}); packed samples must lie end to end with non-decreasing ids")
    return starts_of(segment_ids)


def starts_of(segment_ids: torch.Tensor) -> torch.Tensor:
    """:func:`segment_starts` of ids known to be non-decreasing (no check, no host sync)."""
    B, T = segment_ids.shape
    new = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    pos = torch.arange(T, device=segment_ids.device).expand(B, T)
    return torch.where(new, pos, 0).cummax(dim=1).values.to(torch.int32).contiguous()


def check_key_padding_mask(mask: torch.Tensor, B: int, T: int, device) -> torch.Tensor:
    _check_b_t(mask, "key_padding_mask", "a bool tensor", B, T, device)
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point:
            raise TypeError(f"key_padding_mask must be bool (True = real token), got {mask.dtype}")
        mask = mask.bool()
    return mask


def _check_b_t(x, name: str, kind: str, B: int, T: int, device) -> None:
    """``x`` is a (B, T) tensor on ``device`` (its dtype is the caller's to check)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be {kind} (B, T), got {type(x).__name__}")
    if x.shape != (B, T):
        raise ValueError(f"{name} must have shape (B, T) = ({B}, {T}); got {tuple(x.shape)}")
    if x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")


def as_graph(adjacency, B: int | None = None, T: int | None = None, device=None) -> CausalGraph | None:
    """Accept a CausalGraph or a dense bool (B, T, T) tensor (None stays None); check B and T (given
    together) and the device where given."""
    if adjacency is None:
        return None
    if isinstance(adjacency, torch.Tensor):
        adjacency = CausalGraph.from_dense(adjacency)
    if not isinstance(adjacency, CausalGraph):
        raise TypeError(f"adjacency must be a CausalGraph or a bool tensor (B, T, T); got {type(adjacency).__name__}")
    if B is not None and (adjacency.packed.shape[0] != B or adjacency.packed.shape[1] != T):
        raise ValueError(f"adjacency is for B={adjacency.batch_size}, T={adjacency.seq_len} but the inputs have "
                         f"B={B}, T={T}; build it for this batch (CausalGraph.pad_to pads a shorter one)")
    if device is not None and adjacency.device != torch.device(device):
        raise ValueError(f"adjacency is on {adjacency.device} but the inputs are on {device}; use graph.to(device)")
    return adjacency


def _edge_tensor(sample: list) -> torch.Tensor | None:
    """int64 (n, 2) of a list of (row, col) int pairs, or None (empty, or anything else: the caller's per-edge
    loop then validates and words the error)."""
    if not sample or not all(type(e) in (tuple, list) and len(e) == 2 and type(e[0]) is int and type(e[1]) is int
                             for e in sample):
        return None
    return torch.tensor(sample, dtype=torch.long)
