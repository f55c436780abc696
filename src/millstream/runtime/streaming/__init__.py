"""Streaming execution: one coordinator and one task implementation for both executors.

``job`` (the coordinator and the job handle), ``task`` (a stage partition's long-lived
task: operators, exchanges, watermarks, barrier alignment, snapshots), ``epochs``
(checkpoint restore and completion, sink commits), ``layout`` (checks and the task
layout of a plan), ``inline`` (all tasks stepped in this process), ``wire`` (messages
across processes). Hosts in other processes are the runners' (``Runner.start_stream_hosts``).
"""
