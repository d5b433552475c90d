"""Fake torch.cuda: no GPU; events time with the host clock."""

import time


def is_available():
    return True


def get_device_name(_i=0):
    return "Fake GPU (gpu/tests/fake_torch)"


def set_device(_d):
    pass


def synchronize():
    pass


class Event:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3  # ms


class _Nccl:
    @staticmethod
    def version():
        return (2, 28, 9)


nccl = _Nccl()
