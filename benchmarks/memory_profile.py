"""Resident memory of one training run, sampled every 10 ms and labelled by phase (setup, train, sketch_update,
decide, finish, eval), to find what holds memory (BENCHMARKS.md, issue 18). A profiling aid: it wraps a few
functions of the library to label phases; the run itself is an ordinary `hydra_rank.train.run`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_profile.py configs/scenes.yaml OUT.json \\
        adapter.method=hydra train.max_steps=30 data.eval_samples=32 train.output_dir=runs/profile-hydra

Beside resident memory it samples what glibc has handed out and not had back (mallinfo2: in-use heap plus mapped
blocks), i.e. the live allocations, tensors included: resident memory far above it is freed memory glibc keeps. A
tensor kept alive by mistake shows in the live series (that is how the sketch hooks' retained inputs were found);
fragmentation shows only in the resident one. Run it again with MALLOC_MMAP_THRESHOLD_=131072 in the environment to
see the resident memory without glibc's heap retention. OUT.json: the peaks per phase and the full series (seconds,
phase, resident MiB, live MiB).
"""

from __future__ import annotations

import ctypes
import functools
import json
import sys
import threading
import time
from pathlib import Path

from hydra_rank import train
from hydra_rank.config import load_config
from hydra_rank.rank import scheduler, signals

phase = ["setup"]
peaks: dict[str, float] = {}
live_peaks: dict[str, float] = {}
series: list[tuple[float, str, int, int | None]] = []


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _mallinfo2():
    """glibc's mallinfo2 (glibc >= 2.33), or None on another C library."""
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = MallInfo2
    return function


MALLINFO2 = _mallinfo2()


def live_mib() -> float | None:
    """Bytes allocated through malloc and not yet freed (main arena in use + mapped blocks), in MiB."""
    if MALLINFO2 is None:
        return None
    info = MALLINFO2()
    return (info.uordblks + info.hblkhd) / 2**20


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def sample() -> None:
    start = time.time()
    while True:
        rss, live, label = resident_mib(), live_mib(), phase[-1]
        peaks[label] = max(peaks.get(label, 0.0), rss)
        if live is not None:
            live_peaks[label] = max(live_peaks.get(label, 0.0), live)
        series.append((round(time.time() - start, 2), label, round(rss), None if live is None else round(live)))
        time.sleep(0.01)


def label(owner: object, name: str, text: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def labelled(*args, **kwargs):
        phase.append(text)
        try:
            return original(*args, **kwargs)
        finally:
            phase.pop()

    setattr(owner, name, labelled)


def main() -> None:
    config_path, out, *overrides = sys.argv[1:]
    label(signals.StackedGradientSketch, "update", "sketch_update")
    label(scheduler.HydraScheduler, "_decide", "decide")
    label(train, "train_steps", "train")
    label(train, "finish", "finish")
    label(train, "evaluate_configured", "eval")
    threading.Thread(target=sample, daemon=True).start()
    train.run(load_config(config_path, overrides), overwrite=True, show_progress=False)
    print("resident peaks (MiB):", json.dumps({key: round(value) for key, value in peaks.items()}))
    print("live peaks (MiB):", json.dumps({key: round(value) for key, value in live_peaks.items()}))
    Path(out).write_text(json.dumps({"peaks": peaks, "live_peaks": live_peaks, "series": series}))


if __name__ == "__main__":
    main()
