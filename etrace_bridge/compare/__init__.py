"""`etrace-compare`: the comparison application (online learning vs BPTT in numbers and plots).

An application built on the library, in its own package: `etrace_bridge` never imports it.
cli (command line) -> config -> runs (the comparison; stream for --stream) -> trainers (BPTT,
truncated BPTT, online) / data / factory / measure (memory and time vs T, memory budget) ->
results -> report (tables, plots); tasks and models are its built-in data sets and networks.
"""
