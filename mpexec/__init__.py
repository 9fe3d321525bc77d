"""mpexec: merge queries -> plans -> execution over an mpstore store (see the issues for mergekit parity)."""
