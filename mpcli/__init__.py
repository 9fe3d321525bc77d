"""mpcli: the `mpstore` command line (click); rendering only, the logic lives in mpstore and mpexec."""

import os

# numpy's OpenBLAS (and scipy's, which numba imports) start a worker thread per core that spins for a
# while (~0.3 s of CPU in all) and competes with a merge's threads; the command makes no BLAS calls
# worth threading. Set before anything imports numpy; a value the user set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
