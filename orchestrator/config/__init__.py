"""The job, before anything runs: what a job file may say and every check on it, the plan, the LR schedule
and the sweep's search space. The lowest layer.

Owns: `errors` (the torch-free base classes of the errors a user caused, did-you-mean), `catalog`
(every name a job file may use, and what each named thing can do), `spec` (the typed sections),
`keys` (dotted keys), `checks` (checks across keys), `jobfile` (reading a file and `--set`), `plan`
(spec + data size + world size -> the plan), `schedule` (the LR as a pure function of the step),
`search` (the probes of a sweep space).
May import: nothing else of orchestrator, and never torch or Ray (reading a job file stays fast).
"""
