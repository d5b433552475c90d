"""A tiny stand-in for torch, for testing the GPU suite's programs and run.sh on a machine without
torch or a GPU. Only what collectives.py, counters.py and sweep.py use: 1-D tensors (Python lists,
views share storage), a few in-place ops, comparisons, and (in torch.distributed) collectives
between real processes that exchange data through files. Its NCCL-like log lines follow the
formats that logcheck.py reads. It is NOT torch: it tests the suite's control flow, index
arithmetic and output, not its use of the real API."""



__version__ = "0.0+fake"


class dtype:
    def __init__(self, name, is_float):
        self.name, self.is_float = name, is_float

    def __repr__(self):
        return f"torch.{self.name}"


float32 = dtype("float32", True)
float64 = dtype("float64", True)
int32 = dtype("int32", False)
int64 = dtype("int64", False)
bool = dtype("bool", False)  # noqa: A001 - torch.bool


class device:
    def __init__(self, spec):
        self.spec = str(spec)
        self.type = self.spec.split(":")[0]

    def __str__(self):
        return self.spec

    def __eq__(self, other):
        return str(self) == str(other)

    def __hash__(self):
        return hash(self.spec)


def _dev(d):
    return "cpu" if d is None else str(d)


def _cast(v, dt):
    if dt is bool:
        return 1 if v else 0
    return float(v) if dt.is_float else int(v)


class Tensor:
    def __init__(self, storage, off, n, dt, dev, shape=None):
        self._s, self._off, self._n = storage, off, n
        self.dtype, self.device = dt, dev
        self.shape = (n,) if shape is None else tuple(shape)

    # data access
    def _vals(self):
        return self._s[self._off : self._off + self._n]

    def _set(self, vals):
        if len(vals) != self._n:
            raise RuntimeError(f"fake torch: size mismatch {len(vals)} vs {self._n}")
        self._s[self._off : self._off + self._n] = [_cast(v, self.dtype) for v in vals]
        return self

    def numel(self):
        return self._n

    def __len__(self):
        return self.shape[0] if self.shape else 1

    def dim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            if len(self.shape) != 1:
                raise NotImplementedError("fake torch: slicing 1-D tensors only")
            start, stop, step = idx.indices(self._n)
            if step != 1:
                raise NotImplementedError("fake torch: step slices")
            n = max(0, stop - start)
            return Tensor(self._s, self._off + start, n, self.dtype, self.device)
        if isinstance(idx, tuple):
            flat, mul = 0, 1
            for d, i in zip(reversed(self.shape), reversed(idx)):
                flat += i * mul
                mul *= d
            idx = flat
        else:
            if idx < 0:
                idx += self._n
            if len(self.shape) > 1:
                raise NotImplementedError("fake torch: row indexing")
        if not 0 <= idx < self._n:
            raise IndexError(idx)
        return Tensor([self._s[self._off + idx]], 0, 1, self.dtype, self.device, shape=())

    def item(self):
        if self._n != 1:
            raise RuntimeError("fake torch: item() of a tensor with several elements")
        return self._s[self._off]

    # in-place
    def add_(self, s):
        return self._set([v + s for v in self._vals()])

    def remainder_(self, s):
        return self._set([v % s for v in self._vals()])

    def mul_(self, s):
        return self._set([v * s for v in self._vals()])

    def fill_(self, v):
        return self._set([v] * self._n)

    def zero_(self):
        return self.fill_(0)

    def copy_(self, other):
        return self._set(other._vals())

    # new tensors
    def _new(self, vals, dt=None, dev=None, shape=None):
        dt = dt or self.dtype
        return Tensor([_cast(v, dt) for v in vals], 0, len(vals), dt, dev or self.device, shape)

    def __mul__(self, s):
        return self._new([v * s for v in self._vals()])

    __rmul__ = __mul__

    def __ne__(self, other):
        return self._new([a != b for a, b in zip(self._vals(), other._vals())], dt=bool)

    def __eq__(self, other):
        return self._new([a == b for a, b in zip(self._vals(), other._vals())], dt=bool)

    __hash__ = object.__hash__

    def sum(self):
        dt = int64 if not self.dtype.is_float else self.dtype
        return self._new([sum(self._vals())], dt=dt, shape=())

    def nonzero(self):
        idx = [i for i, v in enumerate(self._vals()) if v]
        return Tensor(idx, 0, len(idx), int64, self.device, shape=(len(idx), 1))

    def to(self, arg):
        if isinstance(arg, dtype):
            return self._new(self._vals(), dt=arg, shape=self.shape)
        return self._new(self._vals(), dev=_dev(arg), shape=self.shape)

    def cpu(self):
        return self.to("cpu")

    def clone(self):
        return self._new(self._vals(), shape=self.shape)

    def detach(self):
        return self

    def double(self):
        return self.to(float64)

    def reshape(self, *shape):
        return Tensor(self._s, self._off, self._n, self.dtype, self.device)

    def tolist(self):
        return self._vals()

    def __repr__(self):
        v = self._vals()
        return f"tensor({v[:8]}{'...' if len(v) > 8 else ''}, dtype={self.dtype}, device={self.device})"


def _size(size):
    if isinstance(size, int):
        return size
    n = 1
    for d in size:
        n *= d
    return n


def arange(start, end=None, dtype=int64, device=None):
    if end is None:
        start, end = 0, start
    vals = list(range(start, end))
    return Tensor([_cast(v, dtype) for v in vals], 0, len(vals), dtype, _dev(device))


def full(size, value, dtype=float32, device=None):
    n = _size(size)
    return Tensor([_cast(value, dtype)] * n, 0, n, dtype, _dev(device))


def zeros(size, dtype=float32, device=None):
    return full(size, 0, dtype, device)


def tensor(data, dtype=None, device=None):
    data = list(data) if isinstance(data, (list, tuple)) else [data]
    dtype = dtype or (float32 if any(isinstance(v, float) for v in data) else int64)
    return Tensor([_cast(v, dtype) for v in data], 0, len(data), dtype, _dev(device))


def equal(a, b):
    return a.shape == b.shape and a._vals() == b._vals()


def cat(ts):
    vals = []
    for t in ts:
        vals += t._vals()
    return Tensor(vals, 0, len(vals), ts[0].dtype, ts[0].device)


class _Version:
    cuda = "0.0+fake"


version = _Version()

from . import cuda  # noqa: E402,F401
from . import distributed  # noqa: E402,F401




def set_num_threads(_n):
    pass
