"""File formats as sources and sinks, by URI (local disk or any object store).

Sources: :mod:`~millstream.io.files.text` (lines), :mod:`~millstream.io.files.csv`,
:mod:`~millstream.io.files.json` (JSON lines), :mod:`~millstream.io.files.parquet`; the
line-oriented ones share byte-range planning (:mod:`~millstream.io.files.ranges`),
line reading (:mod:`~millstream.io.files.lines`), pushdown helpers
(:mod:`~millstream.io.files.pushdown`) and their base class
(:mod:`~millstream.io.files.line_source`), decoding to UTF-8
(:mod:`~millstream.io.files.decoding`), the format check of listed files
(:mod:`~millstream.io.files.formats`) and ``union_by_name`` schemas
(:mod:`~millstream.io.files.union`). :mod:`~millstream.io.files.watch` streams the new
files of a directory; :mod:`~millstream.io.files.badrecords` finds malformed records and
:mod:`~millstream.io.files.dead_letters` says where they go (the ``on_bad_records``
policy; dead-letter files, staged per epoch in streaming jobs). Sinks: the batch file sinks with an atomic commit
(:mod:`~millstream.io.files.sinks`), their JSON-lines encoding
(:mod:`~millstream.io.files.json_encoding`) and the streaming file sink, two-phase per
epoch (:mod:`~millstream.io.files.stream_sink`).
"""
