"""The Prometheus text format as the shim's metrics write it (NCCL_TCPXSHIM_METRICS_DIR
files, `tcpxshim metrics serve` pages): a small parser and the sums the suite needs. Pure Python
(standard library only), so it also runs on the GPU machine, which has no internet.

A sample line is `name{label="value",...} value [timestamp_ms]`; `#` lines (HELP, TYPE) and
blank lines are skipped. Values that are whole numbers come back as Python ints, exactly (byte
counters are compared to the byte); other values as floats."""

import decimal
import re

BYTES = "tcpxshim_bytes_total"
MESSAGES = "tcpxshim_messages_total"

RE_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s+(\S+)(?:\s+(-?[0-9]+))?\s*$")
RE_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class Sample:
    __slots__ = ("name", "labels", "value", "timestamp_ms")

    def __init__(self, name, labels, value, timestamp_ms=None):
        self.name, self.labels, self.value, self.timestamp_ms = name, labels, value, timestamp_ms

    def __repr__(self):
        return f"Sample({self.name!r}, {self.labels!r}, {self.value!r})"


def parse_value(text):
    """'1342177280' -> int; '1.5e9' -> 1500000000 (int: whole); '0.25' -> 0.25; NaN, +Inf, -Inf."""
    if text in ("NaN", "+Inf", "-Inf", "Inf"):
        return float(text)
    try:
        d = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a number: {text!r}")
    return int(d) if d == d.to_integral_value() else float(d)


def parse_labels(text):
    labels, pos, text = {}, 0, text.strip()
    while pos < len(text):
        m = RE_LABEL.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad labels at {text[pos:pos + 40]!r}")
        labels[m.group(1)] = re.sub(r'\\[\\"n]', lambda e: UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return labels


def parse(text):
    """Every sample of a page or file, in order; ValueError (with the line number) on a bad line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = RE_SAMPLE.match(s)
        if not m:
            raise ValueError(f"line {n}: not a sample: {s[:120]!r}")
        try:
            labels = parse_labels(m.group(2) or "")
            value = parse_value(m.group(3))
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None
        out.append(Sample(m.group(1), labels, value, int(m.group(4)) if m.group(4) else None))
    return out


def select(samples, name, **match):
    """The samples of one series name whose labels include every key=value of match."""
    return [s for s in samples if s.name == name and all(s.labels.get(k) == str(v) for k, v in match.items())]


def total(samples, name, **match):
    """Sum of the selected samples (an int when every one is)."""
    return sum(s.value for s in select(samples, name, **match))


def rank_bytes(samples, **match):
    """{'send': bytes, 'recv': bytes} summed over the bytes_total series that match."""
    return {d: total(samples, BYTES, dir=d, **match) for d in ("send", "recv")}


def ranks(samples, name=BYTES):
    """The rank labels that a series name carries."""
    return {s.labels["rank"] for s in samples if s.name == name and "rank" in s.labels}


def conn_key(labels):
    """A connection's identity: all of its labels, sorted, as a hashable tuple."""
    return tuple(sorted(labels.items()))


def conn_name(labels):
    """'r0 send #3 peer 127.0.0.1:40001 dev 0 tcp' for legends and tables."""
    parts = [f"r{labels.get('rank', '?')}", labels.get("dir", "?"), f"#{labels.get('comm', '?')}"]
    if "peer" in labels:
        parts.append(f"peer {labels['peer']}")
    if "dev" in labels:
        parts.append(f"dev {labels['dev']}")
    if "transport" in labels:
        parts.append(labels["transport"])
    return " ".join(parts)


def by_conn(samples, name=BYTES):
    """{conn_key(labels): value} of one series name."""
    return {conn_key(s.labels): s.value for s in samples if s.name == name}


def served_matches(page, files):
    """Whether every bytes_total series of the files is on the page with the same value. A page
    series matches a file series when its labels include the file series' labels (a server may add
    labels of its own). Returns (True, '') or (False, what differs)."""
    served = [(s.labels, s.value) for s in page if s.name == BYTES]
    for f in files:
        for s in f:
            if s.name != BYTES:
                continue
            hits = [v for lab, v in served if all(lab.get(k) == x for k, x in s.labels.items())]
            if not hits:
                return False, f"{conn_name(s.labels)}: not on the page"
            if s.value not in hits:
                return False, f"{conn_name(s.labels)}: {s.value} in the file, {hits[0]} on the page"
    return True, ""
