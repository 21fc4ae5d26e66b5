"""How good a student is: teacher/student agreement, a downstream probe, `distil eval` (retention of each measure)
and `distil plot`."""
