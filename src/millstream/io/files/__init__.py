"""File formats as sources and sinks, by URI (local disk or any object store).

Sources: :mod:`~millstream.io.files.text` (lines), :mod:`~millstream.io.files.csv`,
:mod:`~millstream.io.files.json` (JSON lines), :mod:`~millstream.io.files.parquet`; the
line-oriented ones share byte-range planning (:mod:`~millstream.io.files.ranges`),
line reading (:mod:`~millstream.io.files.lines`), pushdown helpers
(:mod:`~millstream.io.files.pushdown`) and their base class
(:mod:`~millstream.io.files.line_source`). :mod:`~millstream.io.files.watch` streams the
new files of a directory; :mod:`~millstream.io.files.badrecords` handles malformed
records. Sinks: the batch file sinks with an atomic commit
(:mod:`~millstream.io.files.sinks`), their JSON-lines encoding
(:mod:`~millstream.io.files.json_encoding`) and the streaming file sink, two-phase per
epoch (:mod:`~millstream.io.files.stream_sink`).
"""
