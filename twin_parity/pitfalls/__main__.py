"""python -m twin_parity.pitfalls: measure every pitfall and print one line each, with its time."""

import time

from twin_parity.pitfalls import PITFALLS

for pitfall in PITFALLS:
    start = time.perf_counter()
    m = pitfall.check()
    print(f"{pitfall.id:24} {m.ignored!s:>24} {m.pinned!s:>24}  {time.perf_counter() - start:5.1f}s  {m.quantity}")
